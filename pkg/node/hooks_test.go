package node

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/config"
)

// A failing peer_lost hook is retried until it succeeds; peer_back runs
// once, after it, with the peer's name; a second loss of the same peer
// before it came back runs nothing more.
func TestHooksRetryAndOrder(t *testing.T) {
	hookRetry = 20 * time.Millisecond
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	cfg := &config.Config{Node: "nodeB", StateDir: dir, Hooks: config.Hooks{
		// Fails twice (the API is not up yet), then succeeds.
		PeerLost: `echo "lost $DUET_PEER by $DUET_NODE" >> ` + out + `; [ $(wc -l < ` + out + `) -ge 3 ]`,
		PeerBack: `echo "back $DUET_PEER" >> ` + out,
	}}
	n := &Node{cfg: cfg, log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	n.hooks.n = n
	n.hooks.peerLost("nodeA")
	n.hooks.peerLost("nodeA")
	if !n.hooks.pending() {
		t.Fatal("peer_lost ran but nothing is pending for peer_back")
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(n.hooks.status(), "done") {
		if time.Now().After(deadline) {
			t.Fatalf("peer_lost never succeeded: %s", n.hooks.status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := n.hooks.status(); s != "peer_lost nodeA: done (3 tries)" {
		t.Fatalf("status %q", s)
	}
	n.hooks.peerBack()
	for !strings.HasPrefix(n.hooks.status(), "peer_back nodeA: done") {
		if time.Now().After(deadline) {
			t.Fatalf("peer_back never ran: %s", n.hooks.status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	n.hooks.peerBack() // nothing pending: no second run
	time.Sleep(50 * time.Millisecond)
	b, _ := os.ReadFile(out)
	want := "lost nodeA by nodeB\nlost nodeA by nodeB\nlost nodeA by nodeB\nback nodeA\n"
	if string(b) != want {
		t.Fatalf("hooks ran:\n%s\nwant:\n%s", b, want)
	}
}

// peer_back cancels a peer_lost still retrying: the peer is back, the
// taint must not be applied after its removal.
func TestHooksBackCancelsLost(t *testing.T) {
	hookRetry = 20 * time.Millisecond
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	cfg := &config.Config{Node: "nodeB", StateDir: dir, Hooks: config.Hooks{
		PeerLost: "echo lost >> " + out + "; exit 1",
		PeerBack: "echo back >> " + out,
	}}
	n := &Node{cfg: cfg, log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	n.hooks.n = n
	n.hooks.peerLost("nodeA")
	time.Sleep(100 * time.Millisecond)
	n.hooks.peerBack()
	time.Sleep(200 * time.Millisecond)
	b, _ := os.ReadFile(out)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) < 2 || lines[len(lines)-1] != "back" || strings.Count(string(b), "back") != 1 {
		t.Fatalf("hooks ran:\n%s", b)
	}
}

// peer_back while a peer_lost command is still running: the command and
// what it started are killed and peer_back runs at once (it once waited
// for the running hook under the lock that hook needed: a deadlock of the
// cluster loop whenever kubectl hung at the peer's return).
func TestHooksBackKillsRunningLost(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	started := filepath.Join(dir, "started")
	cfg := &config.Config{Node: "nodeB", StateDir: dir, Hooks: config.Hooks{
		PeerLost: "touch " + started + "; sleep 60; echo lost >> " + out,
		PeerBack: "echo back >> " + out,
	}}
	n := &Node{cfg: cfg, log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	n.hooks.n = n
	n.hooks.peerLost("nodeA")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(started); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("peer_lost never started")
		}
		time.Sleep(10 * time.Millisecond)
	}
	returned := make(chan struct{})
	go func() { n.hooks.peerBack(); close(returned) }()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("peerBack blocked behind the running peer_lost command")
	}
	for !strings.HasPrefix(n.hooks.status(), "peer_back nodeA: done") {
		if time.Now().After(deadline) {
			t.Fatalf("peer_back never ran: %s", n.hooks.status())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if b, _ := os.ReadFile(out); string(b) != "back\n" {
		t.Fatalf("hooks wrote %q, want only peer_back's line", b)
	}
}
