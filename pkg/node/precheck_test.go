package node

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// TestPrecheckStandsForTheChecks: the witness and VIP checks a precheck
// passed during the peer's silence are not run again at the takeover;
// they are when a heartbeat came since, when the precheck failed, and
// when it is older than precheckFresh.
func TestPrecheckStandsForTheChecks(t *testing.T) {
	n := testNode(t, t.TempDir())
	var calls atomic.Int32
	var fail atomic.Bool
	n.reachCheck = func() (bool, string) {
		calls.Add(1)
		if fail.Load() {
			return false, "witness unreachable"
		}
		return true, ""
	}
	ctx := context.Background()
	check := func(what string, wantCalls int32) {
		t.Helper()
		if ok, why := n.takeoverChecks(ctx); !ok {
			t.Fatalf("%s: checks failed: %s", what, why)
		}
		if c := calls.Load(); c != wantCalls {
			t.Fatalf("%s: the witness and VIP checks ran %d times in all, want %d", what, c, wantCalls)
		}
	}

	n.lastHeartbeat.Store(1)
	n.startPrecheck()
	n.startPrecheck() // the same silence: not again
	check("after a precheck", 1)

	n.lastHeartbeat.Store(2) // a heartbeat came after the precheck
	check("after a heartbeat that came since the precheck", 2)

	fail.Store(true)
	n.startPrecheck() // for the silence after heartbeat 2, and it fails
	<-n.pre.Load().done
	fail.Store(false)
	check("after a failed precheck", 4)

	n.lastHeartbeat.Store(3)
	n.startPrecheck()
	<-n.pre.Load().done
	time.Sleep(precheckFresh + 50*time.Millisecond)
	check("after a precheck older than precheckFresh", 6)

	// Without a precheck: the checks run.
	n.pre.Store(nil)
	check("without a precheck", 7)
}
