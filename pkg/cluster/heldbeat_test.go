package cluster

import (
	"testing"
	"time"
)

// TestHeldHeartbeatOlderThanTwiceTimeoutRefused: the primary's
// release rule (node.staleCurrent) lets a durability call go without a
// stale peer once its last "synced" heartbeat is 2 x cluster.timeout old,
// because "its Guard refuses heartbeats older than cluster.timeout; twice
// that leaves room for the clocks' drift". But the Guard's drift allowance
// grows without bound with the age of the stored anchor (1 ms per second),
// and an attacker on the path can keep the anchor from ever being renewed
// while both nodes hear each other normally: it delays the heartbeats
// (replica to primary by 0.8 s, primary to replica by 0.5 s, each under
// cluster.timeout) so that every echo is more than cluster.timeout old
// when it arrives, while the stored anchor still finds each heartbeat
// young. After 25 minutes of that (default timeout 1.2 s), the replica
// accepts a primary heartbeat held back for 2.5 s: a "synced" one held
// while the primary released a call past its stale peer turns that peer
// SECOND, able to take over without the call's data.
func TestHeldHeartbeatOlderThanTwiceTimeoutRefused(t *testing.T) {
	const (
		interval = 200 * time.Millisecond
		timeout  = 1200 * time.Millisecond // config.DefaultTimeout
		tick     = 10 * time.Millisecond
	)
	clockP := func(w time.Duration) time.Duration { return 5000*time.Second + w }
	clockR := func(w time.Duration) time.Duration { return 1000*time.Second + w }
	gP, gR := NewGuard(0x1111, timeout), NewGuard(0x2223, timeout)

	type packet struct {
		at   time.Duration
		toR  bool
		h    Heartbeat
		drop bool
	}
	var air []packet
	delayPR, delayRP := 2*time.Millisecond, 2*time.Millisecond
	var lastR time.Duration // world time R last accepted a heartbeat of P
	var maxGapR time.Duration
	var lastP, maxGapP time.Duration // the same for P hearing R
	deliver := func(w time.Duration) {
		keep := air[:0]
		for _, p := range air {
			if p.at > w {
				keep = append(keep, p)
				continue
			}
			if p.drop {
				continue
			}
			h := p.h
			if p.toR {
				if gR.Accept(&h, clockR(w)) {
					gR.Applied(&h)
					if lastR != 0 && w-lastR > maxGapR {
						maxGapR = w - lastR
					}
					lastR = w
				}
			} else if gP.Accept(&h, clockP(w)) {
				gP.Applied(&h)
				if lastP != 0 && w-lastP > maxGapP {
					maxGapP = w - lastP
				}
				lastP = w
			}
		}
		air = keep
	}
	send := func(w time.Duration) {
		if w%interval == interval/2 { // P
			h := Heartbeat{Name: "P", State: Prim}
			gP.Stamp(&h, clockP(w))
			air = append(air, packet{at: w + delayPR, toR: true, h: h})
		}
		if w%interval == 0 { // R
			h := Heartbeat{Name: "R", State: Second}
			gR.Stamp(&h, clockR(w))
			air = append(air, packet{at: w + delayRP, h: h})
		}
	}
	w := time.Duration(0)
	run := func(until time.Duration) {
		for ; w < until; w += tick {
			deliver(w)
			send(w)
		}
	}
	// A normal link: the anchors are set.
	run(5 * time.Second)
	anchor := gR.anchor
	// The attacker delays every heartbeat, each by less than the timeout.
	delayPR, delayRP = 500*time.Millisecond, 800*time.Millisecond
	lastR, maxGapR, lastP, maxGapP = 0, 0, 0, 0
	run(5*time.Second + 25*time.Minute)
	t.Logf("25 min of delayed heartbeats: the replica heard the primary at most %v apart, the primary the replica %v; the replica's anchor %v (was %v)", maxGapR, maxGapP, gR.anchor, anchor)
	if maxGapR > timeout || maxGapP > timeout || gR.anchor != anchor {
		t.Skipf("the delays did not keep the anchor (gap %v, anchor moved %v)", maxGapR, gR.anchor != anchor)
	}
	// The primary says "synced" now; the attacker holds it and drops
	// what follows.
	hs := Heartbeat{Name: "P", State: Prim, Synced: true}
	gP.Stamp(&hs, clockP(w))
	sentAt := w
	for i := range air {
		if air[i].toR {
			air[i].drop = true
		}
	}
	held := sentAt + 2*timeout + 100*time.Millisecond
	for ; w < held; w += tick {
		deliver(w)
		if w%interval == 0 { // R goes on; P's later heartbeats are dropped
			h := Heartbeat{Name: "R", State: Second, Stale: true}
			gR.Stamp(&h, clockR(w))
			air = append(air, packet{at: w + delayRP, h: h})
		}
	}
	if gR.Accept(&hs, clockR(w)) {
		t.Errorf("the replica accepted a primary heartbeat %v old (2 x cluster.timeout is %v): the anchor was %v old, allowing %v more",
			w-sentAt, 2*timeout, clockR(w)-gR.anchor, (clockR(w)-gR.anchor)/1e6*MaxClockDrift)
	}
}
