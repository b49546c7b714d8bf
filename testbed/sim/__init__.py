"""A discrete-event simulator of PeerSync sites driven by the product's own control-plane code (issue 12).

`network` (links as reservation calendars, topology, the emulation host), `node` (a node's store,
downloads and engine as the real index section and the pure policy see them), `site` (sites with
their real trackers, syncs over a simulated transport, pulls, churn), `election` (the bully election
of `peer.policy.election` over simulated whois rounds), `study` (the experiments, the table and the
plots of bench/SIMULATION.md; `python bench/simulate.py --all`). Outside the product wheel.
"""
