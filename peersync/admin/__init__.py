"""The admin endpoint of a running daemon (`server`), the CLI's client of it (`client`), and the
daemon's Prometheus metrics (`metrics`)."""
