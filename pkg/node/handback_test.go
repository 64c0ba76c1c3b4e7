package node

import (
	"testing"
	"time"
)

// TestReleasedNothingWaitsForCallsInProgress: a failed serve's Clean is
// read once the durability calls begun before it have ended: one that
// had read the term's primaries before they stopped could still be
// released alone after a plain read of releasedAlone, and the receiver
// would hand the role back to a giver lacking it (a review).
func TestReleasedNothingWaitsForCallsInProgress(t *testing.T) {
	n := &Node{}
	end := n.waiting.begin(time.Now())
	got := make(chan bool, 1)
	go func() { got <- n.releasedNothing() }()
	select {
	case c := <-got:
		t.Fatalf("answered %v while a call begun before was in progress", c)
	case <-time.After(50 * time.Millisecond):
	}
	n.releasedAlone.Store(true) // the call is released alone on its way out
	end()
	if <-got {
		t.Fatal("clean, though a call begun before was released alone")
	}
	n.releasedAlone.Store(false)
	if !n.releasedNothing() {
		t.Fatal("not clean with no call in progress and none released alone")
	}
}
