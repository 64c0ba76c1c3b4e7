package replica

import (
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// The ship stage alone, without a Primary: numbering, the bytes in
// flight, acknowledgements in order, durable acks answering sync
// requests, and what the sender is given.

func TestOutboxNumbersAndAcksInOrder(t *testing.T) {
	o := newOutbox()
	if o.last() != 0 || !o.empty() || !o.settled() {
		t.Fatalf("new outbox: last %d, empty %v, settled %v", o.last(), o.empty(), o.settled())
	}
	t0 := time.Unix(1000, 0)
	for i := 1; i <= 3; i++ {
		seq := o.number()
		if seq != uint64(i) {
			t.Fatalf("batch %d numbered %d", i, seq)
		}
		o.push(sentBatch{seq: seq, frame: make([]byte, 100*i), since: t0.Add(time.Duration(i) * time.Second)})
	}
	if o.last() != 3 || o.bytes != 600 || o.empty() {
		t.Fatalf("three batches: last %d, bytes %d, empty %v", o.last(), o.bytes, o.empty())
	}
	if got := o.oldest(); !got.Equal(t0.Add(time.Second)) {
		t.Errorf("oldest %v, want the first batch's", got)
	}
	var lags []time.Duration
	onAck := func(l time.Duration) { lags = append(lags, l) }
	if !o.ack(2, t0.Add(10*time.Second), onAck) {
		t.Error("a first ack of batch 2 says nothing moved")
	}
	if len(lags) != 2 || lags[0] != 9*time.Second || lags[1] != 8*time.Second {
		t.Errorf("lags of the two batches acknowledged: %v, want [9s 8s]", lags)
	}
	if o.bytes != 300 || len(o.batches) != 1 || o.batches[0].seq != 3 || o.acked != 2 {
		t.Errorf("after ack 2: %d bytes, %d batches, acked %d", o.bytes, len(o.batches), o.acked)
	}
	// An older ack (a resumed connection's welcome) moves nothing back.
	lags = nil
	if o.ack(1, t0, onAck) || o.acked != 2 || len(lags) != 0 || o.bytes != 300 {
		t.Errorf("an older ack: acked %d, %d lags, %d bytes", o.acked, len(lags), o.bytes)
	}
	if o.settled() {
		t.Error("settled with batch 3 in flight")
	}
	o.ack(3, t0, nil)
	if !o.empty() || o.bytes != 0 {
		t.Errorf("after the last ack: empty %v, bytes %d", o.empty(), o.bytes)
	}
	if o.settled() {
		t.Error("settled with batches applied but none durable")
	}
	if moved, _ := o.markDurable(3); !moved || !o.settled() {
		t.Errorf("durable up to 3: moved %v, settled %v", moved, o.settled())
	}
	if moved, _ := o.markDurable(2); moved || o.durable != 3 {
		t.Errorf("an older durable ack moved durable to %d", o.durable)
	}
}

func TestOutboxFullAtTheBound(t *testing.T) {
	o := newOutbox()
	o.push(sentBatch{seq: o.number(), frame: make([]byte, maxUnacked)})
	if o.full() {
		t.Error("full at exactly maxUnacked: the bound is what may be in flight")
	}
	o.push(sentBatch{seq: o.number(), frame: make([]byte, 1)})
	if !o.full() {
		t.Error("not full past maxUnacked")
	}
	o.ack(1, time.Now(), nil)
	if o.full() {
		t.Error("still full once the big batch is acknowledged")
	}
}

func TestOutboxSyncRequests(t *testing.T) {
	o := newOutbox()
	if !o.askSync(5) {
		t.Error("a first request is not news")
	}
	if o.askSync(5) || o.askSync(4) {
		t.Error("a request for what is already asked is news: the sender would be woken for nothing")
	}
	if !o.askSync(6) || o.syncReq != 6 {
		t.Errorf("a later request: syncReq %d", o.syncReq)
	}
	at := time.Unix(2000, 0)
	o.syncSent(5, at)
	o.syncSent(6, at.Add(time.Millisecond)) // the older one is still unanswered: it is the one timed
	if _, asked := o.markDurable(4); !asked.IsZero() {
		t.Error("a durable ack below the request answered it")
	}
	moved, asked := o.markDurable(5)
	if !moved || !asked.Equal(at) {
		t.Errorf("the durable ack of the request: moved %v, asked %v (want %v)", moved, asked, at)
	}
	if _, asked := o.markDurable(6); !asked.IsZero() {
		t.Error("a request was answered twice")
	}
	// A new connection forgets what was asked on the last one.
	o.syncSent(7, at)
	o.connect()
	if _, asked := o.markDurable(7); !asked.IsZero() {
		t.Error("a request of an earlier connection was timed on this one")
	}
}

func TestOutboxPendingForTheSender(t *testing.T) {
	o := newOutbox()
	cur := sendCursor{}
	var w sendWork
	if o.pending(&cur, &w) {
		t.Fatalf("nothing queued, yet work: %+v", w)
	}
	for range 3 {
		o.push(sentBatch{seq: o.number(), frame: []byte{1}})
	}
	o.askSync(2)
	w = sendWork{}
	if !o.pending(&cur, &w) || len(w.batches) != 3 || w.syncTo != 2 || w.lazy || w.done != nil {
		t.Fatalf("three batches and a request: %+v", w)
	}
	cur.sent, cur.syncSent = 3, 2
	// Resumed at batch 2 (the peer had it): only batch 3 goes again.
	w = sendWork{}
	c2 := sendCursor{sent: 2, syncSent: 2}
	if !o.pending(&c2, &w) || len(w.batches) != 1 || w.batches[0].seq != 3 {
		t.Errorf("resumed after 2: %+v", w)
	}
	// A sync request whose batches are not all written waits for them,
	// not for nothing: it is not work alone.
	o.askSync(5)
	w = sendWork{}
	if o.pending(&cur, &w) {
		t.Errorf("a request up to batch 5 with batch 3 written is work: %+v", w)
	}
	o.push(sentBatch{seq: o.number(), frame: []byte{1}})
	o.push(sentBatch{seq: o.number(), frame: []byte{1}})
	w = sendWork{}
	if !o.pending(&cur, &w) || len(w.batches) != 2 || w.syncTo != 5 {
		t.Errorf("batches 4 and 5 and the request: %+v", w)
	}
	cur.sent, cur.syncSent = 5, 5
	// A lazy request is handed out once.
	o.askLazy()
	w = sendWork{}
	if !o.pending(&cur, &w) || !w.lazy {
		t.Errorf("a lazy request: %+v", w)
	}
	w = sendWork{}
	if o.pending(&cur, &w) {
		t.Errorf("the lazy request handed out twice: %+v", w)
	}
	// The resync's end, queued after its batches (resyncQueued), goes
	// after them, and again on a new connection.
	o.push(sentBatch{seq: o.number(), frame: []byte{1}})
	end := &wire.Frame{Type: wire.TypeSync, Flags: wire.FlagResyncDone, Seq: 6}
	o.resyncEnds(end)
	w = sendWork{}
	if !o.pending(&cur, &w) || w.done != end || len(w.batches) != 1 || w.batches[0].seq != 6 {
		t.Errorf("the resync's end with its last batch: %+v", w)
	}
	cur.sent = 6
	o.doneSent = true
	w = sendWork{}
	if o.pending(&cur, &w) {
		t.Errorf("the resync's end sent twice on one connection: %+v", w)
	}
	o.connect()
	w = sendWork{}
	if !o.pending(&cur, &w) || w.done != end {
		t.Errorf("the resync's end not sent again on a new connection: %+v", w)
	}
	// A lost session forgets the batches and the end: a new
	// connection's sender (which starts again at 0, and has sent the
	// requests) is given nothing.
	o.drop()
	w = sendWork{}
	if o.pending(&sendCursor{syncSent: 5, lazySent: 1}, &w) || o.bytes != 0 {
		t.Errorf("after drop: %+v, %d bytes", w, o.bytes)
	}
	if o.last() != 6 {
		t.Errorf("numbers go on after a lost session: last %d, want 6", o.last())
	}
}

// From a review: a second resync on one connection sends its end, and a
// lost session forgets the end whatever the sender wrote.
func TestOutboxResyncEndForgotten(t *testing.T) {
	o := newOutbox()
	o.push(sentBatch{seq: o.number(), frame: []byte{1}})
	o.resyncEnds(&wire.Frame{Type: wire.TypeSync, Flags: wire.FlagResyncDone, Seq: 1})
	o.doneSent = true
	o.resyncBegins()
	end2 := &wire.Frame{Type: wire.TypeSync, Flags: wire.FlagResyncDone, Seq: 1}
	o.resyncEnds(end2)
	var w sendWork
	if !o.pending(&sendCursor{sent: 1}, &w) || w.done != end2 {
		t.Errorf("the second resync's end is not sent on the same connection: %+v", w)
	}
	o.drop()
	w = sendWork{}
	if o.pending(&sendCursor{sent: 1}, &w) || w.done != nil {
		t.Errorf("a lost session's resync end still handed out: %+v", w)
	}
}
