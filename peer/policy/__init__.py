"""The download engine's policy: pure functions and small value types that take state and return
decisions. `peer.engine` holds the state and does the I/O (tasks, HTTP, store writes); every choice
it makes about *what* to do comes from here, so the same rules can be unit-tested by the hundred
without a network or an event loop, and a scale simulator can drive the code the daemon runs.

Nothing here touches a clock, the network, the store or global randomness: time comes in as `now`,
randomness as a `random.Random`, and the engine's counters and tasks stay in the engine. The
`policy-pure` import-linter contract (pyproject.toml) keeps it so.

The model, one module per concept:

- `holdings`   what a peer holds of a blob (`BlobView`), which views are worth using, who holds what.
- `history`    a peer's recent transfers: a sliding window, the newest and freshest weighing most,
               and weighted quantiles over it.
- `peerstats`  what we measured of a peer (the window, queue, chunk and poll failure streaks, drops;
               the EWMA kept for the baseline) and the model: the predicted upper bound on its
               response time given its queue (the Tail-Learning seed, arXiv 2312.16883).
- `subnet`     which peers are on this node's subnet: the same-subnet preference.
- `choice`     the peer a chunk is asked from: the smallest bound at the queue the request joins,
               counting the round's own assignments (the bound rule); the EWMA and random baselines.
- `window`     how many chunk requests a blob keeps in flight: the bandwidth-delay product.
- `schedule`   which missing chunks go to which peer this round: wanted first, then rarest first,
               within the blob's window and the engine-wide cap; a reader's read-ahead.
- `striping`   who fetches which chunk from the origin: the interested nodes, stripe owners, stalled
               owners and their single heir, the run one origin request covers.
- `hedging`    which straggling peer requests get a second request (past their p99 bound), and to
               whom, within the window and the engine-wide cap.
- `gathering`  whether to keep waiting for the nodes of a burst to join before dealing stripes.
- `index`      the tracker's index: holdings per blob and member, bounded candidate sets, origin
               leases (who fetches which run from the uplink), replica counts.
- `fanout`     which peers a node polls itself when there is no tracker (at most 8, stable).
- `popularity` sliding-window request counts per blob, per node and site-wide; heat; the order
               across blobs once readers are served (`by_heat`).
- `eviction`   the cache's eviction score (popularity, recency, replicas), its order, the last copy
               of a hot blob, and the plan against the watermarks (`peer.cache` acts on it).
- `replication` which site-hot, scarce blob an idle node copies from its peers (`peer.replication`).
"""
