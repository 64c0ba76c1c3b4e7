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

// hookLab is a state directory with hooks that log what they run to out.
type hookLab struct {
	dir, out string
	cfg      config.Hooks
}

func newHookLab(t *testing.T) *hookLab {
	dir := t.TempDir()
	out := filepath.Join(dir, "out")
	return &hookLab{dir: dir, out: out, cfg: config.Hooks{
		PeerLost:      `echo "lost $DUET_PEER by $DUET_NODE" >> ` + out,
		PeerBack:      `echo "back $DUET_PEER" >> ` + out,
		PeerLostAfter: time.Minute,
	}}
}

// start is a daemon starting on the state directory.
func (l *hookLab) start(t *testing.T) *hooks {
	t.Helper()
	h, err := newHooks(&config.Config{Node: "nodeB", StateDir: l.dir, Hooks: l.cfg}, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func (l *hookLab) ran() string {
	b, _ := os.ReadFile(l.out)
	return string(b)
}

// step gives the hooks the cluster loop's view of one tick and waits for
// the command it started, if any, to end.
func step(t *testing.T, h *hooks, v peerView) {
	t.Helper()
	h.tick(v)
	settle(t, h)
}

// settle waits until no command runs: what ran is in out, and nothing
// runs before the next tick.
func settle(t *testing.T, h *hooks) {
	t.Helper()
	waitFor(t, "the hook command to end", func() bool {
		h.mu.Lock()
		defer h.mu.Unlock()
		return h.run == nil
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// What the cluster loop sees of the peer.
func silent(now time.Time) peerView { return peerView{now: now, serving: true} }
func heard(now time.Time) peerView  { return peerView{now: now, serving: true, heard: true} }
func mirror(now time.Time) peerView {
	return peerView{now: now, serving: true, heard: true, back: true}
}

// The secondary's daemon restarts (systemctl restart duet, a reboot, a
// short link failure): the primary loses it for a few seconds, then hears
// it again. Nothing is tainted: the out-of-service taint on a running node
// has Kubernetes delete its pods.
func TestHooksShortSilenceTaintsNothing(t *testing.T) {
	l := newHookLab(t)
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, false)
	for _, v := range []peerView{silent(t0.Add(time.Second)), silent(t0.Add(4 * time.Second)),
		heard(t0.Add(5 * time.Second)), mirror(t0.Add(20 * time.Second)), mirror(t0.Add(2 * time.Minute))} {
		step(t, h, v)
	}
	if got := l.ran(); got != "" {
		t.Fatalf("a peer silent for 5 s: hooks ran\n%s", got)
	}
	if _, lost := h.status(); lost != "" {
		t.Fatalf("status still shows a lost peer: %q", lost)
	}
}

// A crashed peer confirmed down by fencing gets peer_lost at once, and
// peer_back once it is a mirror again (not while it resyncs).
func TestHooksFencedPeerTaintedThenUntainted(t *testing.T) {
	l := newHookLab(t)
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, true)
	step(t, h, silent(t0.Add(2*time.Second)))
	if got := l.ran(); got != "lost nodeA by nodeB\n" {
		t.Fatalf("fenced peer: hooks ran %q, want peer_lost", got)
	}
	if last, lost := h.status(); last != "peer_lost nodeA: done (1 tries)" || !strings.Contains(lost, "peer_back owed") {
		t.Fatalf("status %q, %q", last, lost)
	}
	step(t, h, heard(t0.Add(time.Minute))) // back, resyncing
	step(t, h, mirror(t0.Add(2*time.Minute)))
	step(t, h, mirror(t0.Add(3*time.Minute)))
	if got := l.ran(); got != "lost nodeA by nodeB\nback nodeA\n" {
		t.Fatalf("hooks ran %q, want peer_lost then one peer_back", got)
	}
	if _, lost := h.status(); lost != "" {
		t.Fatalf("status still shows a lost peer: %q", lost)
	}
}

// The serving daemon restarts after peer_lost ran: the new daemon still
// runs peer_back when the peer returns (the taint stayed on forever), and
// does not run peer_lost again for the same loss.
func TestHooksBackOwedAcrossRestart(t *testing.T) {
	l := newHookLab(t)
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, true)
	step(t, h, silent(t0.Add(2*time.Second)))

	h = l.start(t)
	if _, lost := h.status(); !strings.Contains(lost, "nodeA confirmed down, peer_lost done: peer_back owed") {
		t.Fatalf("restarted daemon's status: %q", lost)
	}
	step(t, h, silent(t0.Add(5*time.Minute)))
	step(t, h, mirror(t0.Add(6*time.Minute)))
	if got := l.ran(); got != "lost nodeA by nodeB\nback nodeA\n" {
		t.Fatalf("hooks ran %q, want peer_lost before the restart and peer_back after", got)
	}
	// Once peer_back succeeded, a further restart owes nothing.
	h = l.start(t)
	step(t, h, mirror(t0.Add(7*time.Minute)))
	if got := l.ran(); got != "lost nodeA by nodeB\nback nodeA\n" {
		t.Fatalf("hooks ran %q after peer_back succeeded and a restart", got)
	}
}

// A peer_lost that had not succeeded before a restart runs again only
// once the peer is confirmed down again; peer_back stays owed meanwhile.
func TestHooksUnfinishedLostConfirmedAgainAfterRestart(t *testing.T) {
	hookRetry = 20 * time.Millisecond
	l := newHookLab(t)
	ok := filepath.Join(l.dir, "api-up")
	l.cfg.PeerLost = `echo "lost $DUET_PEER" >> ` + l.out + `; [ -e ` + ok + ` ]`
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, true)
	h.tick(silent(t0.Add(2 * time.Second)))
	waitFor(t, "peer_lost to fail", func() bool { return l.ran() != "" })
	h.mu.Lock()
	r := h.run
	h.run = nil
	h.mu.Unlock()
	r.cancel()
	<-r.done // the daemon stops

	os.WriteFile(ok, nil, 0o644)
	h = l.start(t)
	before := l.ran()
	step(t, h, silent(t0.Add(30*time.Second)))
	if got := l.ran(); got != before {
		t.Fatalf("peer_lost ran again after a restart, not confirmed again:\n%s", got)
	}
	step(t, h, silent(t0.Add(61*time.Second))) // no check configured: the silence confirms
	if got := l.ran(); !strings.HasSuffix(got, "lost nodeA\n") || got == before {
		t.Fatalf("confirmed down again after the restart: hooks ran %q", got)
	}
	step(t, h, mirror(t0.Add(2*time.Minute)))
	if got := l.ran(); !strings.HasSuffix(got, "lost nodeA\nback nodeA\n") {
		t.Fatalf("hooks ran %q, want peer_back last", got)
	}
}

// A peer silent for long while Kubernetes still sees its node Ready is not
// down (a network split with both alive): peer_lost waits, the check is
// tried again every hookRetry, and peer_lost runs once the node is
// NotReady. Before peer_lost_after, not even the check runs.
func TestHooksSilentButReadyNotTainted(t *testing.T) {
	hookRetry = 5 * time.Second // the fake clock's
	l := newHookLab(t)
	ready := filepath.Join(l.dir, "ready")
	os.WriteFile(ready, []byte("True\n"), 0o644)
	l.cfg.PeerLostCheck = "echo check >> " + l.out + `; [ "$(cat ` + ready + `)" != True ]`
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, false)
	for _, s := range []int{1, 30, 59, 61, 62, 65, 67} {
		step(t, h, silent(t0.Add(time.Duration(s)*time.Second)))
	}
	if got := l.ran(); got != "check\ncheck\n" {
		t.Fatalf("node Ready: hooks ran %q, want two checks (at 61 s and 67 s) and no peer_lost", got)
	}
	if last, lost := h.status(); !strings.HasPrefix(last, "peer_lost_check nodeA: not confirmed down") || !strings.Contains(lost, "not confirmed down") {
		t.Fatalf("status %q, %q", last, lost)
	}
	os.WriteFile(ready, []byte("Unknown\n"), 0o644)
	step(t, h, silent(t0.Add(73*time.Second)))
	step(t, h, silent(t0.Add(74*time.Second)))
	if got := l.ran(); got != "check\ncheck\ncheck\nlost nodeA by nodeB\n" {
		t.Fatalf("node NotReady: hooks ran %q, want a third check then peer_lost", got)
	}
}

// A failing peer_lost hook is retried until it succeeds; peer_back runs
// once, after it; a second loss of the same peer before it came back runs
// nothing more.
func TestHooksRetryAndOrder(t *testing.T) {
	hookRetry = 20 * time.Millisecond
	l := newHookLab(t)
	// Fails twice (the API is not up yet), then succeeds.
	l.cfg.PeerLost = `echo "lost $DUET_PEER by $DUET_NODE" >> ` + l.out + `; [ $(wc -l < ` + l.out + `) -ge 3 ]`
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, true)
	h.tick(silent(t0))
	h.lost("nodeA", t0, true)
	step(t, h, silent(t0))
	if last, _ := h.status(); last != "peer_lost nodeA: done (3 tries)" {
		t.Fatalf("status %q", last)
	}
	step(t, h, mirror(t0))
	step(t, h, mirror(t0))
	want := "lost nodeA by nodeB\nlost nodeA by nodeB\nlost nodeA by nodeB\nback nodeA\n"
	if got := l.ran(); got != want {
		t.Fatalf("hooks ran:\n%s\nwant:\n%s", got, want)
	}
}

// peer_back cancels a peer_lost still retrying: the peer is back, the
// taint must not be applied after its removal.
func TestHooksBackCancelsLost(t *testing.T) {
	hookRetry = 20 * time.Millisecond
	l := newHookLab(t)
	l.cfg.PeerLost = "echo lost >> " + l.out + "; exit 1"
	l.cfg.PeerBack = "echo back >> " + l.out
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, true)
	h.tick(silent(t0))
	waitFor(t, "peer_lost to fail twice", func() bool { return strings.Count(l.ran(), "lost") >= 2 })
	step(t, h, mirror(t0))
	time.Sleep(100 * time.Millisecond) // a peer_lost retry would come within it
	got := l.ran()
	if lines := strings.Split(strings.TrimSpace(got), "\n"); lines[len(lines)-1] != "back" || strings.Count(got, "back") != 1 {
		t.Fatalf("hooks ran:\n%s", got)
	}
}

// peer_back while a peer_lost command is still running: the command and
// what it started are killed and peer_back runs at once (it once waited
// for the running hook under the lock that hook needed: a deadlock of the
// cluster loop whenever kubectl hung at the peer's return).
func TestHooksBackKillsRunningLost(t *testing.T) {
	l := newHookLab(t)
	started := filepath.Join(l.dir, "started")
	l.cfg.PeerLost = "touch " + started + "; sleep 60; echo lost >> " + l.out
	l.cfg.PeerBack = "echo back >> " + l.out
	h := l.start(t)
	t0 := time.Now()
	h.lost("nodeA", t0, true)
	h.tick(silent(t0))
	waitFor(t, "peer_lost to start", func() bool { _, err := os.Stat(started); return err == nil })
	returned := make(chan struct{})
	go func() { h.tick(mirror(t0)); close(returned) }()
	select {
	case <-returned:
	case <-time.After(10 * time.Second):
		t.Fatal("the tick blocked behind the running peer_lost command")
	}
	settle(t, h)
	if last, _ := h.status(); !strings.HasPrefix(last, "peer_back nodeA: done") {
		t.Fatalf("peer_back did not run: %s", last)
	}
	if got := l.ran(); got != "back\n" {
		t.Fatalf("hooks wrote %q, want only peer_back's line", got)
	}
}

// TestLossStep: the decisions, one step at a time.
func TestLossStep(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	p := lossPolicy{after: time.Minute, check: true, retry: 5 * time.Second}
	suspect := loss{Peer: "nodeA", Suspect: true, Since: t0}
	tests := []struct {
		name    string
		l       loss
		v       peerView
		running hookKind
		p       lossPolicy
		want    loss
		act     hookAct
	}{
		{"silent briefly: wait", suspect, silent(at(10)), hookNone, p, suspect, hookAct{}},
		{"heard again: forgotten", suspect, heard(at(10)), hookNone, p, loss{Peer: "nodeA", Since: t0},
			hookAct{say: "peer heard again before it was confirmed down: peer_lost not run"}},
		{"heard while checking: the check stops", suspect, heard(at(70)), hookCheck, p, loss{Peer: "nodeA", Since: t0},
			hookAct{stop: true, say: "peer heard again before it was confirmed down: peer_lost not run"}},
		{"silent long, not serving: wait", suspect, peerView{now: at(70)}, hookNone, p, suspect, hookAct{}},
		{"silent long: check", suspect, silent(at(70)), hookNone, p,
			loss{Peer: "nodeA", Suspect: true, Since: t0, nextCheck: at(75)}, hookAct{start: hookCheck}},
		{"check running: wait", suspect, silent(at(70)), hookCheck, p, suspect, hookAct{}},
		{"checked not long ago: wait", loss{Peer: "nodeA", Suspect: true, Since: t0, nextCheck: at(75)}, silent(at(72)), hookNone, p,
			loss{Peer: "nodeA", Suspect: true, Since: t0, nextCheck: at(75)}, hookAct{}},
		{"silent long, no check: down", suspect, silent(at(60)), hookNone, lossPolicy{after: time.Minute},
			loss{Peer: "nodeA", Since: t0, Owed: true}, hookAct{start: hookLost, say: "peer confirmed down: silent for 1m0s"}},
		{"checked: down", loss{Peer: "nodeA", Suspect: true, Since: t0, confirmed: true}, silent(at(70)), hookNone, p,
			loss{Peer: "nodeA", Since: t0, Owed: true, confirmed: true},
			hookAct{start: hookLost, say: "peer confirmed down: silent for 1m0s and peer_lost_check succeeded"}},
		{"fenced: down at once", loss{Peer: "nodeA", Suspect: true, Since: t0, fenced: true}, silent(at(2)), hookNone, p,
			loss{Peer: "nodeA", Since: t0, Owed: true, fenced: true},
			hookAct{start: hookLost, say: "peer confirmed down: the fencing command succeeded"}},
		{"owed, resyncing: wait", loss{Peer: "nodeA", Owed: true, Done: true}, heard(at(100)), hookNone, p,
			loss{Peer: "nodeA", Owed: true, Done: true}, hookAct{}},
		{"owed, mirror: peer_lost stops, peer_back", loss{Peer: "nodeA", Owed: true}, mirror(at(100)), hookLost, p,
			loss{Peer: "nodeA", Owed: true}, hookAct{stop: true, start: hookBack, say: "peer back"}},
		{"owed, the peer serves: peer_back", loss{Peer: "nodeA", Owed: true, Done: true}, peerView{now: at(100), heard: true, back: true}, hookNone, p,
			loss{Peer: "nodeA", Owed: true, Done: true}, hookAct{start: hookBack, say: "peer back"}},
		{"owed, peer_back running: wait", loss{Peer: "nodeA", Owed: true, Done: true}, mirror(at(100)), hookBack, p,
			loss{Peer: "nodeA", Owed: true, Done: true}, hookAct{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, act := tt.l.step(tt.v, tt.running, tt.p)
			if got != tt.want || act != tt.act {
				t.Fatalf("step:\n got %+v %+v\nwant %+v %+v", got, act, tt.want, tt.act)
			}
		})
	}
}

// TestLossLost: a loss while one is suspected or a peer_back is owed.
func TestLossLost(t *testing.T) {
	t0 := time.Unix(1_000_000, 0)
	later := t0.Add(time.Hour)
	say := "peer lost: peer_lost waits until it is confirmed down"
	tests := []struct {
		name    string
		l       loss
		fenced  bool
		running hookKind
		want    loss
		act     hookAct
	}{
		{"first loss", loss{}, false, hookNone, loss{Peer: "nodeA", Suspect: true, Since: later}, hookAct{say: say}},
		{"suspected already: the silence counts from the first", loss{Peer: "nodeA", Suspect: true, Since: t0}, true, hookNone,
			loss{Peer: "nodeA", Suspect: true, Since: t0, fenced: true}, hookAct{}},
		{"peer_lost done, peer_back owed: nothing more", loss{Peer: "nodeA", Since: t0, Owed: true, Done: true}, false, hookNone,
			loss{Peer: "nodeA", Since: t0, Owed: true, Done: true}, hookAct{}},
		{"lost during peer_back: it stops, still owed", loss{Peer: "nodeA", Since: t0, Owed: true, Done: true}, false, hookBack,
			loss{Peer: "nodeA", Suspect: true, Since: later, Owed: true, Done: true}, hookAct{stop: true, say: say}},
		{"back and lost again", loss{Peer: "nodeA", Since: t0}, true, hookNone,
			loss{Peer: "nodeA", Suspect: true, Since: later, fenced: true}, hookAct{say: say}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, act := tt.l.lost("nodeA", later, tt.fenced, tt.running)
			if got != tt.want || act != tt.act {
				t.Fatalf("lost:\n got %+v %+v\nwant %+v %+v", got, act, tt.want, tt.act)
			}
		})
	}
	if got := (loss{Peer: "nodeA", Since: t0, Owed: true}).restarted(); !got.Suspect {
		t.Fatalf("restarted with peer_lost unfinished: %+v, want suspected again", got)
	}
	if got := (loss{Peer: "nodeA", Since: t0, Owed: true, Done: true}).restarted(); got.Suspect {
		t.Fatalf("restarted with peer_lost done: %+v, want peer_back owed only", got)
	}
}
