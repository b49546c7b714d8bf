"""The control plane's I/O (docs/control-plane.md): discovery, the member's sync loop and
elections, the tracker's routes. Every decision it acts on is made by a pure module in
`peer.policy`; this package only moves messages and keeps time."""
