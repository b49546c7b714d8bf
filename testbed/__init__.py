"""The testbed: real registries, containerds, daemons, images and network namespaces on one machine.

Used by the integration tests, the demo (`peersync-testbed demo`) and the benchmarks; nothing here is mocked.

- `procs`: `ManagedProcess` (log file, readiness polling, stop by PID: SIGTERM then SIGKILL),
  `running(...)` context manager, `free_port()`, `run_checked()` (raises `CommandError` with stderr).
- `registry`: `start_registry(workdir, auth=Credentials(...), proxy_remote=url)` -> `Registry`
  (docker-registry 2.8 from Debian; htpasswd bcrypt auth; pull-through proxy mode).
- `images`: declare layers with `file/directory/symlink/hardlink/fifo/whiteout/opaque`, write an OCI
  layout (`OciLayout`), push with skopeo (`push_image`); `build_test_image()` (5 tricky layers plus the
  expected rootfs), `build_sized_image()` (benchmark images, streamed, cached by parameters).
- `containerd`: `start_containerd(workdir, extra_config=TOML)` -> `Containerd` with `ctr()`, `pull()`,
  `run()`, `rmi(sync=True)`, `gc()`, `mount_image()`.
- `peersyncd`: `start_peersync(workdir, config=TOML)` runs the real daemon; `loopback.start_node()`
  wires a daemon, its containerd and a hosts.toml into one loopback node.
- `pki`: site CAs and node certificates made with `peersync site init/issue`; every daemon the
  harness starts gets one unless its config says otherwise, so the nodes speak mutual TLS.
- `netns` / `cluster`: an emulated edge site (node namespaces, a tbf-shaped uplink, byte counters)
  and a PeerSync node on each of its nodes.

How a filesystem is checked: the expected tree is computed in Python from the layer declarations
(`expected_manifest`). The exact comparison mounts the image's unpacked snapshot on the host
(`Containerd.mount_image`: a View snapshot of the image's rootfs chain ID in the snapshotter asked
for, mounted from that snapshotter's own Mounts; `ctr images mount` only for the builtin overlayfs,
since ctr 1.6 ignores its `--snapshotter`) and walks it with lstat/listxattr (`snapshot_tree`): type, mode incl.
setuid/sticky, uid/gid, size, sha256, symlink target, user xattrs, mtimes and hard-link identity. A
second, runtime check lists the tree inside a runc container with busybox (`LISTING_SCRIPT`), which
cannot see xattrs, mtimes or inode identity; both are compared with `compare_manifests`.
"""
