package config

// From a review of the configuration, the CLI and the service stack (forty-second session): each test failed on 589ea28.

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// wantRefused fails unless Parse refuses cfg with an error containing want.
func wantRefused(t *testing.T, cfg, want string) {
	t.Helper()
	_, err := Parse([]byte(cfg))
	if err == nil {
		t.Fatalf("accepted; want an error naming %q", want)
	}
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not name %q", err, want)
	}
}

// A negative check_interval is accepted; the stack's watcher then calls
// time.NewTicker with it, which panics: the daemon dies once it serves.
func TestServiceNegativeCheckInterval(t *testing.T) {
	cfg, _ := baseIn(t)
	wantRefused(t, cfg+"services: [{name: web, start: 'sleep 1000', check_interval: -1s}]\n", "services[0].check_interval")
}

// Negative start/stop timeouts are accepted: a stop then SIGKILLs at once
// (no grace after SIGTERM, stop command cancelled before it runs).
func TestServiceNegativeTimeouts(t *testing.T) {
	cfg, _ := baseIn(t)
	t.Run("stop_timeout", func(t *testing.T) {
		wantRefused(t, cfg+"services: [{name: db, start: 'sleep 1000', stop_timeout: -10s}]\n", "services[0].stop_timeout")
	})
	t.Run("start_timeout", func(t *testing.T) {
		wantRefused(t, cfg+"services: [{name: db, start: 'sleep 1000', start_timeout: -5s}]\n", "services[0].start_timeout")
	})
}

// Two replicated directories, one inside the other, are accepted: both
// replicas capture, ship and resync the same files.
func TestNestedReplicatedDirs(t *testing.T) {
	cfg, dir := baseIn(t)
	inner := filepath.Join(dir, "data", "inner")
	os.Mkdir(inner, 0o755)
	t.Run("nested", func(t *testing.T) {
		wantRefused(t, cfg+"  - path: "+inner+"\n", "replicate[1].path")
	})
	t.Run("same path twice", func(t *testing.T) {
		wantRefused(t, cfg+"  - {name: again, path: "+filepath.Join(dir, "data")+"/}\n", "replicate[1].path")
	})
}

// The k3s module's directories plus a user directory holding them are
// accepted (the module's own directories are checked against each other
// only).
func TestK3SUserDirHoldsModuleDirs(t *testing.T) {
	cfg, dir := k3sBase(t)
	wantRefused(t, cfg+"replicate:\n  - {name: all, path: "+filepath.Join(dir, "k3s")+"}\n", "replicate[0].path")
}

// replicate: / (with a name) and a state_dir under it: the state_dir check
// compares with "//" and misses it.
func TestStateDirInsideRootReplica(t *testing.T) {
	cfg, _ := baseIn(t)
	cfg = strings.Replace(cfg, "  - path: ", "  - {name: root, path: /}\n  - path: ", 1)
	wantRefused(t, cfg, "state_dir")
}

// The state_dir reached through a symlink inside a replicated directory
// is accepted: the check is lexical.
func TestStateDirThroughSymlink(t *testing.T) {
	cfg, dir := baseIn(t)
	real := filepath.Join(dir, "data", "duet-state")
	os.Mkdir(real, 0o700)
	link := filepath.Join(dir, "statelink")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	cfg = strings.Replace(cfg, "state_dir: "+filepath.Join(dir, "state"), "state_dir: "+link, 1)
	wantRefused(t, cfg, "state_dir")
}

// The control socket inside a replicated directory is accepted.
func TestSocketInsideReplica(t *testing.T) {
	cfg, dir := baseIn(t)
	wantRefused(t, cfg+"socket: "+filepath.Join(dir, "data", "duet.sock")+"\n", "socket")
	cfg2, _ := baseIn(t)
	wantRefused(t, cfg2+"socket: duet.sock\n", "socket")
}

// A VIP equal to this node's or the peer's own address is accepted: the
// ARP probe finds the peer answering for it (no takeover ever), or
// releasing the VIP removes the node's own address.
func TestVIPIsANodeAddress(t *testing.T) {
	for _, a := range []string{"10.250.0.2/24", "10.250.0.1/24"} {
		t.Run(a, func(t *testing.T) {
			cfg, _ := baseIn(t)
			wantRefused(t, strings.Replace(cfg, "10.250.0.100/24", a, 1), "vip.address")
		})
	}
}

// k3s: mysql_port equal to nfs_port (or to listen's port) is accepted; the
// second server then cannot bind and the services restart-loop and fail
// over.
func TestK3SPortClash(t *testing.T) {
	cfg, _ := k3sBase(t)
	t.Run("mysql=nfs", func(t *testing.T) {
		wantRefused(t, cfg+"  mysql_port: 2049\n", "mysql_port")
	})
	t.Run("mysql=listen", func(t *testing.T) {
		// mariadbd binds every address (--bind-address=0.0.0.0).
		wantRefused(t, cfg+"  mysql_port: 7788\n", "mysql_port")
	})
	t.Run("nfs=listen", func(t *testing.T) {
		wantRefused(t, cfg+"  nfs_port: 7788\n", "nfs_port")
	})
}

// A listen port that is not a number or out of range is accepted.
func TestListenPortRange(t *testing.T) {
	cfg, _ := baseIn(t)
	wantRefused(t, strings.Replace(cfg, "listen: 10.250.0.1:7788", "listen: 10.250.0.1:99999", 1), "listen")
	wantRefused(t, strings.Replace(cfg, "peer: 10.250.0.2:7788", "peer: 10.250.0.2:duet", 1), "peer")
}
