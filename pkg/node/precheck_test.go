package node

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
)

// TestPrecheckStandsForTheChecks: the VIP probe a precheck passed during
// the peer's silence is not made again at the takeover; it is when a
// heartbeat came since, when the precheck failed, and when it is older
// than precheckFresh.
func TestPrecheckStandsForTheChecks(t *testing.T) {
	n := testNode(t, t.TempDir())
	var calls atomic.Int32
	var fail atomic.Bool
	n.vipProbe = func() (bool, string) {
		calls.Add(1)
		if fail.Load() {
			return false, "VIP answered"
		}
		return true, ""
	}
	// Fresh until the case that wants it stale: a loaded machine may
	// take long between a precheck's end and the takeover's checks.
	defer func(f time.Duration) { precheckFresh = f }(precheckFresh)
	precheckFresh = time.Hour
	ctx := context.Background()
	check := func(what string, wantCalls int32) {
		t.Helper()
		if ok, why, _ := n.takeoverChecks(ctx); !ok {
			t.Fatalf("%s: checks failed: %s", what, why)
		}
		if c := calls.Load(); c != wantCalls {
			t.Fatalf("%s: the VIP was probed %d times in all, want %d", what, c, wantCalls)
		}
	}

	n.lastHeartbeat.Store(1)
	n.startPrecheck(1)
	n.startPrecheck(1) // the same silence: not again
	check("after a precheck", 1)

	n.lastHeartbeat.Store(2) // a heartbeat came after the precheck
	check("after a heartbeat that came since the precheck", 2)

	fail.Store(true)
	n.startPrecheck(2) // for the silence after heartbeat 2, and it fails
	<-n.pre.Load().done
	fail.Store(false)
	check("after a failed precheck", 4)

	n.lastHeartbeat.Store(3)
	n.startPrecheck(3)
	<-n.pre.Load().done
	precheckFresh = time.Millisecond
	time.Sleep(10 * time.Millisecond)
	check("after a precheck older than precheckFresh", 6)

	// Without a precheck: the checks run.
	n.pre.Store(nil)
	check("without a precheck", 7)
}

// TestPrecheckTakeoverWitnessedSinceLoss: a node that took over its lost
// peer, its checks passed, releases the durability calls it holds as soon
// as it has announced ALONE (peerCannotTakeOver: the witness answered
// since the peer was lost), with or without a precheck. With one, the
// witness answered before the loss, and the calls wait for watchWitness's
// next ping (up to 100 ms later): the services' first fsyncs after a
// takeover. The witness here is 127.0.0.1 (the ping needs root).
func TestPrecheckTakeoverWitnessedSinceLoss(t *testing.T) {
	const e = 4<<8 | 2
	for _, pre := range []bool{false, true} {
		name := "checks at the takeover"
		if pre {
			name = "precheck"
		}
		t.Run(name, func(t *testing.T) {
			n := testNode(t, t.TempDir())
			n.cfg.Cluster.Witness = "127.0.0.1"
			if err := n.pingWitness(); err != nil {
				t.Skipf("cannot ping a witness here: %v", err)
			}
			n.vipProbe = func() (bool, string) { return true, "" }
			hb := bootNanos()
			n.lastHeartbeat.Store(hb)
			if pre {
				n.startPrecheck(hb) // the silence's last stretch
				<-n.pre.Load().done
			}
			// EvPeerLost: the loop notes when, the check goroutine runs
			// the takeover's checks.
			n.peerLostAt.Store(bootNanos())
			if ok, why, _ := n.takeoverChecks(context.Background()); !ok {
				t.Fatalf("checks failed: %s", why)
			}
			if pre && n.pre.Load() == nil {
				t.Fatal("no precheck")
			}
			// It serves, ALONE, and has said so.
			n.machine.Store(&cluster.Machine{Name: "nodeB", ID: 2, State: cluster.Alone, Epoch: e})
			n.announcedAlone.Store(e)
			if !n.peerCannotTakeOver() {
				t.Error("ALONE after a takeover and announced, but the witness's last answer (the precheck's) came before the peer was declared lost: held durability calls wait for watchWitness's next ping")
			}
		})
	}
}

// TestPrecheckNotInOrdinaryHeartbeatGap: a precheck (three ARP requests
// for the VIP and a witness ping) starts only once a heartbeat is
// missing, not in the ordinary gap between two heartbeats (an interval,
// seen by the loop up to a tick late), for every interval and timeout
// the configuration accepts (interval ≥ 10ms, timeout ≥ 3 intervals).
// Otherwise a SECOND prechecks after every heartbeat, for ever.
func TestPrecheckNotInOrdinaryHeartbeatGap(t *testing.T) {
	for _, c := range []struct{ interval, timeout time.Duration }{
		{200 * time.Millisecond, 1200 * time.Millisecond},
		{200 * time.Millisecond, 600 * time.Millisecond},
		{100 * time.Millisecond, 300 * time.Millisecond},
		{50 * time.Millisecond, 150 * time.Millisecond},
		{10 * time.Millisecond, 30 * time.Millisecond},
	} {
		n := testNode(t, t.TempDir())
		n.cfg.Cluster.Interval, n.cfg.Cluster.Timeout = c.interval, c.timeout
		starts := n.precheckAfter()
		if starts == c.timeout {
			continue // no room: no precheck
		}
		if gap := c.interval + n.loopTick(); starts <= gap || starts > c.timeout {
			t.Errorf("interval %v, timeout %v: a precheck starts after %v of silence, within the ordinary gap between heartbeats (%v) or after the timeout",
				c.interval, c.timeout, starts, gap)
		}
	}
}
