// Starting and stopping a real `peersync daemon` for one suite case.
//
// Each factory call of containerd's suites gets a daemon of its own, rooted at the directory the
// suite hands out: that is what the suites assume of a factory (a fresh, empty store; keys and
// refs that no other case sees, since the snapshot cases run in parallel and list everything),
// and it needs no key-prefixing layer of ours between the suite and the daemon. The peer exchange
// and the mirror get their own loopback ports (the defaults would clash between daemons).
//
// The Go side starts the daemons because only it knows when the suite wants one (a factory
// call per case, up to -test.parallel at once) and where (the case's temp root). It stops each by
// PID when the case ends, and a non-zero exit status fails the case. The snapshot suite clears the
// umask for its whole run, so those daemons start with umask 0, as an in-process snapshotter
// would run under the suite; the suite checks the modes it gets (RootPermission: 0755).
package conformance

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/containerd/defaults"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/pkg/dialer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

var (
	daemonCommand = flag.String("peersync.daemon", "",
		`JSON array: the command that runs peersync's CLI, e.g. ["python3", "-m", "peersync.cli"]`)
	logDir = flag.String("peersync.logs", "", "directory for the daemons' logs (default: a temp dir)")
)

const (
	readyTimeout = 60 * time.Second
	stopTimeout  = 20 * time.Second
)

var daemonSeq int64

type daemon struct {
	cmd     *exec.Cmd
	socket  string
	sockDir string
	logPath string
	exited  chan struct{}
	waitErr error
}

// startDaemon runs `peersync daemon --root root` and waits until its socket accepts connections.
func startDaemon(ctx context.Context, root, kind string) (*daemon, error) {
	var argv []string
	if err := json.Unmarshal([]byte(*daemonCommand), &argv); err != nil || len(argv) == 0 {
		return nil, fmt.Errorf("-peersync.daemon must be a JSON array naming peersync's CLI, got %q", *daemonCommand)
	}
	// unix socket paths are limited to 108 bytes: keep it short, apart from the suite's dirs
	sockDir, err := os.MkdirTemp("/tmp", "psgo-")
	if err != nil {
		return nil, err
	}
	logs := *logDir
	if logs == "" {
		logs = sockDir
	}
	seq := atomic.AddInt64(&daemonSeq, 1)
	logPath := filepath.Join(logs, fmt.Sprintf("%s-%03d.log", kind, seq))
	config, err := loopbackConfig()
	if err != nil {
		return nil, err
	}
	configPath := filepath.Join(sockDir, "peersync.toml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		return nil, err
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()

	d := &daemon{socket: filepath.Join(sockDir, "peersync.sock"), sockDir: sockDir, logPath: logPath,
		exited: make(chan struct{})}
	args := append(append([]string{}, argv[1:]...),
		"daemon", "--root", root, "--socket", d.socket, "--config", configPath)
	d.cmd = exec.Command(argv[0], args...)
	d.cmd.Stdout, d.cmd.Stderr = logFile, logFile
	// If this test binary dies, its daemons die with it; otherwise they are stopped by PID.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { d.waitErr = d.cmd.Wait(); close(d.exited) }()
	log.G(ctx).Infof("peersync daemon pid %d, root %s, log %s", d.cmd.Process.Pid, root, logPath)

	deadline := time.Now().Add(readyTimeout)
	for delay := 20 * time.Millisecond; ; delay = min(delay*3/2, 250*time.Millisecond) {
		select {
		case <-d.exited:
			return nil, fmt.Errorf("peersync daemon exited before serving its socket (%v); log %s:\n%s",
				d.waitErr, logPath, logTail(logPath))
		default:
		}
		if conn, err := net.DialTimeout("unix", d.socket, time.Second); err == nil {
			conn.Close()
			return d, nil
		}
		if time.Now().After(deadline) {
			_ = d.stop()
			return nil, fmt.Errorf("peersync daemon not serving its socket after %v; log %s:\n%s",
				readyTimeout, logPath, logTail(logPath))
		}
		time.Sleep(delay)
	}
}

// stop sends SIGTERM (SIGKILL after stopTimeout); a non-zero exit status is an error.
func (d *daemon) stop() error {
	defer os.RemoveAll(d.sockDir)
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(stopTimeout):
		_ = d.cmd.Process.Kill()
		<-d.exited
		return fmt.Errorf("peersync daemon did not stop within %v of SIGTERM; log %s:\n%s",
			stopTimeout, d.logPath, logTail(d.logPath))
	}
	if d.waitErr != nil {
		return fmt.Errorf("peersync daemon: %v; log %s:\n%s", d.waitErr, d.logPath, logTail(d.logPath))
	}
	return nil
}

// dial connects to the daemon exactly as containerd connects to a proxy plugin
// (services/server: proxyClients.getClient).
func dial(socket string) (*grpc.ClientConn, error) {
	backoffConfig := backoff.DefaultConfig
	backoffConfig.MaxDelay = 3 * time.Second
	return grpc.Dial(dialer.DialAddress(socket),
		grpc.WithInsecure(),
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoffConfig}),
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(defaults.DefaultMaxRecvMsgSize)),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(defaults.DefaultMaxSendMsgSize)),
	)
}

// loopbackConfig: the daemon's config with the peer exchange, the mirror and /metrics on free
// loopback ports (as testbed.peersyncd.loopback_config does), no peers, no origin.
func loopbackConfig() (string, error) {
	peer, err := freePort()
	if err != nil {
		return "", err
	}
	mirror, err := freePort()
	if err != nil {
		return "", err
	}
	metrics, err := freePort()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("[peer]\nlisten = \"127.0.0.1:%d\"\npeers = []\n[mirror]\nlisten = \"127.0.0.1:%d\"\n"+
		"[admin]\nlisten = \"127.0.0.1:%d\"\n", peer, mirror, metrics), nil
}

// freePort: a port the kernel says is free on 127.0.0.1 now (the daemon binds it right after).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func logTail(path string) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	if len(data) > 4000 {
		data = data[len(data)-4000:]
	}
	return string(data)
}

func min(a, b time.Duration) time.Duration {
	if a < b {
		return a
	}
	return b
}
