package replica

import (
	"context"
	"testing"
	"time"
)

// TestBarrierAfterLostRecordsWaitsForRescanAll: the capture overflowed its
// marks too (ctr.Rescan): the caller's write is in no record, and the
// barrier's Drain, through takeOverflow, calls RescanAll before the target
// is counted. RescanAll asks for a comparison of every file (needFull,
// forceAll) but counts nothing (p.added stays), so the call's target is
// what the last pass already covered. The call waits while needFull
// holds. The resync that ships the lost write requeues one change (a file
// removed or renamed between its scan and its read: b.blocked), so it
// leaves the cover as the passes set it, and clears needFull: the call
// counts itself covered by the old pass's batch, long durable, and returns
// with the resync's batches (the lost write among them) not on the peer.
func TestBarrierAfterLostRecordsWaitsForRescanAll(t *testing.T) {
	p := unconnectedPrimary(t)
	p.mu.Lock()
	// Steady state: the last pass covered every change counted (5) in
	// batches up to 10, which the peer made durable.
	p.connected, p.needFull = true, false
	p.added, p.cover.mark, p.cover.seq, p.out.next = 5, 5, 10, 11
	p.out.acked, p.out.durable = 10, 10
	p.mu.Unlock()
	// The write's record is lost, the marks overflowed: the barrier's
	// Drain (takeOverflow) asks for a full comparison, then counts.
	p.RescanAll()
	done := make(chan error, 1)
	go func() { done <- p.WaitShipped(context.Background(), nil, Release{}) }()
	select {
	case err := <-done:
		t.Fatalf("the call returned (%v) before any resync", err)
	case <-time.After(100 * time.Millisecond):
	}
	// fullSync begins (mark = p.added) and its batch 11 is queued with one
	// change requeued; the peer has not applied batch 11 yet.
	p.mu.Lock()
	p.rs.Active = true
	mark := p.added
	p.mu.Unlock()
	queueBlockedResync(t, p, mark)
	p.Wake()
	select {
	case err := <-done:
		p.mu.Lock()
		end, durable := p.fullSyncEnd, p.out.durable
		p.mu.Unlock()
		t.Fatalf("the call returned (%v) with the resync that ships the lost write queued up to batch %d and only %d durable on the peer", err, end, durable)
	case <-time.After(300 * time.Millisecond):
	}
}
