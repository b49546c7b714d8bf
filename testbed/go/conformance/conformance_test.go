// containerd's own conformance suites, run against a real `peersync daemon` through containerd's
// proxy clients: the snapshots and content services exactly as containerd's proxy plugins call
// them (same dial options, same client code), one daemon per suite case (see daemon_test.go).
//
// Build and run (GOPATH mode over Debian's containerd sources; testbed/gotools.py does this):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go test -c -o conformance.test .
//	./conformance.test -test.v -peersync.daemon '["python3", "-m", "peersync.cli"]'
package conformance

import (
	"context"
	"testing"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/content"
	contentproxy "github.com/containerd/containerd/content/proxy"
	contentsuite "github.com/containerd/containerd/content/testsuite"
	"github.com/containerd/containerd/snapshots"
	snapshotsproxy "github.com/containerd/containerd/snapshots/proxy"
	snapshotsuite "github.com/containerd/containerd/snapshots/testsuite"
)

// The proxy plugin's name goes in every snapshots request; the daemon ignores it.
const snapshotterName = "peersync"

func TestSnapshotter(t *testing.T) {
	snapshotsuite.SnapshotterSuite(t, snapshotterName,
		func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
			d, err := startDaemon(ctx, root, "snapshots")
			if err != nil {
				return nil, nil, err
			}
			conn, err := dial(d.socket)
			if err != nil {
				_ = d.stop()
				return nil, nil, err
			}
			sn := snapshotsproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName)
			return sn, func() error {
				_ = sn.Close()
				_ = conn.Close()
				return d.stop()
			}, nil
		})
}

func TestContent(t *testing.T) {
	contentsuite.ContentSuite(t, "peersync",
		func(ctx context.Context, root string) (context.Context, content.Store, func() error, error) {
			d, err := startDaemon(ctx, root, "content")
			if err != nil {
				return ctx, nil, nil, err
			}
			conn, err := dial(d.socket)
			if err != nil {
				_ = d.stop()
				return ctx, nil, nil, err
			}
			cs := contentproxy.NewContentStore(contentapi.NewContentClient(conn))
			return ctx, cs, func() error {
				_ = conn.Close()
				return d.stop()
			}, nil
		})
}
