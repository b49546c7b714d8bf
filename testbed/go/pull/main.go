// pull: pull an image the way nerdctl does with a snapshotter it has no special support for.
//
//	pull --address CONTAINERD_SOCK --namespace NS --snapshotter NAME --hosts-dir DIR [--json] REF
//
// It calls exactly
//
//	client.Pull(ctx, ref, containerd.WithPullUnpack, containerd.WithPullSnapshotter(name),
//		containerd.WithResolver(resolver))
//
// with a docker resolver configured from the hosts directory as `ctr --hosts-dir` configures it
// (remotes/docker/config.ConfigureHosts with HostDirFromRoot), and no
// snapshotters.AppendInfoHandlerWrapper: nerdctl adds that wrapper (the labels that name each
// layer to the snapshotter) only for the remote snapshotters it knows (stargz, nydus, ...).
//
// What it reports besides the image and the time taken: how many of the image's layers
// containerd handled itself, seen from the client, without changing what the pull does.
//   - fetched: in containerd 1.6 the client process downloads the blobs, so the resolver's HTTP
//     client sees each one; its transport is wrapped to record the layers it fetched (a GET of
//     /v2/<name>/blobs/<digest> answered 2xx, or 3xx when the registry redirects to storage).
//     A layer is not fetched when the content store already offers it (the daemon's Info answers
//     with its size, the skip signal) or when the snapshotter unpacked it itself.
//   - applied: the unpacker (client side too) applies each layer it did not find unpacked with
//     one Diff/Apply call to containerd's diff service; a unary interceptor on the client's gRPC
//     connection records the layer of each successful call. A layer the snapshotter unpacked
//     itself (the remote-snapshot handshake) is never applied by containerd.
//
// Both observers only look: requests and answers pass unchanged, and the connection is dialled
// with containerd.New's own default options plus the interceptor.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd"
	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/images"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/platforms"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/remotes/docker/config"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

type result struct {
	Image         string   `json:"image"`
	Target        string   `json:"target"`
	Seconds       float64  `json:"seconds"`
	Layers        int      `json:"layers"`
	FetchedLayers int      `json:"fetched_layers"` // layers the client downloaded itself
	Fetched       []string `json:"fetched"`
	AppliedLayers int      `json:"applied_layers"` // layers containerd's diff service applied
	Applied       []string `json:"applied"`
}

func main() {
	address := flag.String("address", "/run/containerd/containerd.sock", "containerd's socket")
	namespace := flag.String("namespace", "default", "containerd namespace")
	snapshotter := flag.String("snapshotter", containerd.DefaultSnapshotter, "snapshotter to unpack into")
	hostsDir := flag.String("hosts-dir", "", "registry host configuration directory (as ctr --hosts-dir)")
	plainHTTP := flag.Bool("plain-http", false, "default to plain HTTP for registries without a hosts.toml (as ctr)")
	jsonOut := flag.Bool("json", false, "print the result as one JSON object")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags] REF\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	ref := flag.Arg(0)
	res, err := pull(*address, *namespace, *snapshotter, *hostsDir, *plainHTTP, ref)
	if err != nil {
		fmt.Fprintf(os.Stderr, "pull: %v\n", err)
		os.Exit(1)
	}
	if *jsonOut {
		_ = json.NewEncoder(os.Stdout).Encode(res)
		return
	}
	fmt.Printf("image: %s\ntarget: %s\ntook: %.3fs\n", res.Image, res.Target, res.Seconds)
	fmt.Printf("layers fetched by containerd: %d of %d\nlayers applied by containerd: %d of %d\n",
		res.FetchedLayers, res.Layers, res.AppliedLayers, res.Layers)
}

func pull(address, namespace, snapshotter, hostsDir string, plainHTTP bool, ref string) (*result, error) {
	ctx := namespaces.WithNamespace(context.Background(), namespace)
	applied := &digestSet{seen: map[string]bool{}}
	client, err := containerd.New(address, containerd.WithDialOpts(dialOptions(applied)))
	if err != nil {
		return nil, err
	}
	defer client.Close()

	blobs := &digestSet{seen: map[string]bool{}}
	hostOptions := config.HostOptions{
		UpdateClient: func(c *http.Client) error {
			transport := c.Transport
			if transport == nil {
				transport = http.DefaultTransport
			}
			c.Transport = &countingTransport{next: transport, blobs: blobs}
			return nil
		},
	}
	if plainHTTP {
		hostOptions.DefaultScheme = "http"
	}
	if hostsDir != "" {
		hostOptions.HostDir = config.HostDirFromRoot(hostsDir)
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: config.ConfigureHosts(ctx, hostOptions)})

	start := time.Now()
	img, err := client.Pull(ctx, ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(snapshotter),
		containerd.WithResolver(resolver),
	)
	if err != nil {
		return nil, err
	}
	took := time.Since(start)

	manifest, err := images.Manifest(ctx, client.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		return nil, fmt.Errorf("reading the pulled image's manifest: %w", err)
	}
	res := &result{Image: img.Name(), Target: img.Target().Digest.String(), Seconds: took.Seconds(),
		Layers: len(manifest.Layers), Fetched: []string{}, Applied: []string{}}
	for _, layer := range manifest.Layers {
		if blobs.has(layer.Digest.String()) {
			res.Fetched = append(res.Fetched, layer.Digest.String())
		}
		if applied.has(layer.Digest.String()) {
			res.Applied = append(res.Applied, layer.Digest.String())
		}
	}
	sort.Strings(res.Fetched)
	sort.Strings(res.Applied)
	res.FetchedLayers, res.AppliedLayers = len(res.Fetched), len(res.Applied)
	return res, nil
}

// dialOptions: containerd.New's default dial options (client.go), plus an interceptor that
// records the layer of every successful Diff/Apply call.
func dialOptions(applied *digestSet) []grpc.DialOption {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	record := func(ctx context.Context, method string, req, reply interface{}, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		err := invoker(ctx, method, req, reply, cc, opts...)
		if r, ok := req.(*diffapi.ApplyRequest); ok && err == nil && r.Diff != nil {
			applied.add(r.Diff.Digest.String())
		}
		return err
	}
	return []grpc.DialOption{
		grpc.WithBlock(),
		grpc.WithInsecure(),
		grpc.FailOnNonTempDialError(true),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithReturnConnectionError(),
		grpc.WithChainUnaryInterceptor(record),
	}
}

// digestSet: digests seen by an observer, safe for the pull's concurrent handlers.
type digestSet struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (s *digestSet) add(dgst string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seen[dgst] = true
}

func (s *digestSet) has(dgst string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.seen[dgst]
}

// countingTransport records the blobs the resolver downloaded (a GET answered 2xx or 3xx).
type countingTransport struct {
	next  http.RoundTripper
	blobs *digestSet
}

func (t *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.next.RoundTrip(req)
	if err == nil && req.Method == http.MethodGet && resp.StatusCode >= 200 && resp.StatusCode < 400 {
		if i := strings.LastIndex(req.URL.Path, "/blobs/"); i >= 0 {
			t.blobs.add(req.URL.Path[i+len("/blobs/"):])
		}
	}
	return resp, err
}
