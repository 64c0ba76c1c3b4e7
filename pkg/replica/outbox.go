package replica

import (
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

// sentBatch is a batch the build stage queued: its number, its frame as
// sent, and the capture time of the oldest change in it. buf, when set,
// holds the frame's buffer for reuse (see frameBuf).
type sentBatch struct {
	seq   uint64
	frame []byte
	since time.Time
	buf   *frameBuf
}

// frameBuf is the buffer of a big batch's frame, which the batcher built
// in place (the ops behind room for the header) and handed over instead
// of copying: once the peer has acknowledged the batch and no sender is
// writing it, the batcher builds its next batches in it (outbox.spare),
// instead of the runtime finding, faulting in and zeroing 4 MiB for
// each, and collecting the last.
type frameBuf struct {
	b []byte
	// refs counts the outbox's hold (until the ack, or drop) and each
	// sender writing the frame (pin); under Primary.mu, as the outbox.
	refs int
}

// maxSpares is how many acknowledged frames' buffers the outbox keeps
// for the batcher: a writer that flushes every MiB has up to three in
// flight or being acknowledged while the batcher fills the next.
const maxSpares = 4

// outbox is a Primary's ship stage: the batches built and not yet
// acknowledged, in order, what the peer acknowledged of them (applied,
// then durable), and the sync requests that ask it to make them durable.
//
// Who uses it: the build stage numbers and queues batches (number,
// push) and waits while it is full; the sender (writeBatches) takes the
// batches after the last it wrote (after) and the requests to send; the
// ack reader (readAcks) records the peer's answers (ack, markDurable);
// durability calls ask for a batch to be made durable (askSync) and wait
// for durable to reach it. It has no lock of its own and wakes no one:
// every method is called with Primary.mu held, and the caller signals
// the Primary's conditions.
type outbox struct {
	batches []sentBatch // built, not yet acknowledged, in order
	bytes   int         // the memory the frames in batches hold (held)
	next    uint64      // the number the next batch gets; the first is 1
	acked   uint64      // highest batch the peer applied
	durable uint64      // highest batch the peer applied and synced
	syncReq uint64      // highest batch asked to be made durable
	// syncAsked is when the oldest sync request not yet acknowledged
	// durable was sent, for batch syncAskedSeq (latency.SyncRTT).
	syncAsked    time.Time
	syncAskedSeq uint64
	// lazy counts the periodic sync requests (see keeper): the peer
	// syncs in the background and acknowledges what it made durable.
	lazy uint64
	// doneReq is the resync-done frame to send after every batch up to
	// its Seq still queued; doneSent, whether it was on this connection.
	doneReq  *wire.Frame
	doneSent bool
	// wireBytes counts the bytes of the batches written to connections.
	wireBytes uint64
	// spares are buffers of acknowledged frames no one holds (frameBuf),
	// at most maxSpares, for the batcher's next batches.
	spares [][]byte
}

func newOutbox() outbox { return outbox{next: 1} }

// number hands out the next batch's number.
func (o *outbox) number() uint64 {
	seq := o.next
	o.next++
	return seq
}

// last is the number of the last batch built (0: none yet).
func (o *outbox) last() uint64 { return o.next - 1 }

// push queues a batch numbered by number, in order.
func (o *outbox) push(b sentBatch) {
	o.batches = append(o.batches, b)
	o.bytes += b.held()
}

// held is the memory b's frame holds: its buffer's whole room when the
// frame was built in place (frameRoom, whatever its length), its length
// otherwise.
func (b sentBatch) held() int {
	if b.buf != nil {
		return cap(b.buf.b)
	}
	return len(b.frame)
}

// full reports whether the frames in flight passed maxUnacked: the build
// stage waits for acknowledgements.
func (o *outbox) full() bool { return o.bytes > maxUnacked }

// empty reports whether every batch built was acknowledged.
func (o *outbox) empty() bool { return len(o.batches) == 0 }

// settled reports whether every batch built was acknowledged, and every
// one acknowledged was made durable.
func (o *outbox) settled() bool { return len(o.batches) == 0 && o.durable >= o.acked }

// oldest is the capture time of the oldest change in a batch not yet
// acknowledged (zero: none).
func (o *outbox) oldest() time.Time {
	if len(o.batches) == 0 {
		return time.Time{}
	}
	return o.batches[0].since
}

// ack records that the peer applied every batch up to seq and lets go of
// them; onAck, if set, gets the age of each at now. It reports whether
// the peer acknowledged a batch it had not before.
func (o *outbox) ack(seq uint64, now time.Time, onAck func(lag time.Duration)) bool {
	moved := seq > o.acked
	if moved {
		o.acked = seq
	}
	i := 0
	for i < len(o.batches) && o.batches[i].seq <= seq {
		o.bytes -= o.batches[i].held()
		o.unpin(o.batches[i])
		if onAck != nil {
			onAck(now.Sub(o.batches[i].since))
		}
		i++
	}
	// Let go of the acknowledged frames: the array, which the collector
	// sees whole, would keep them until an append moves it. In an
	// initial sync of a million files that was 125 MB of frames held
	// where maxUnacked allows 64 MiB, and the heap's goal twice that.
	clear(o.batches[:i])
	o.batches = o.batches[i:]
	return moved
}

// pin holds b's frame while a sender writes it: its buffer is not reused
// before unpin, even if the batch is acknowledged (or dropped) meanwhile.
func (o *outbox) pin(b sentBatch) {
	if b.buf != nil {
		b.buf.refs++
	}
}

// unpin lets go of a hold on b's frame (the outbox's, or a sender's
// pin); the last one gives its buffer to the spares if there is room.
func (o *outbox) unpin(b sentBatch) {
	if b.buf == nil {
		return
	}
	b.buf.refs--
	if b.buf.refs == 0 && len(o.spares) < maxSpares {
		o.spares = append(o.spares, b.buf.b[:0])
	}
}

// spare returns an acknowledged frame's buffer no one holds, emptied, or
// nil.
func (o *outbox) spare() []byte {
	n := len(o.spares)
	if n == 0 {
		return nil
	}
	b := o.spares[n-1]
	o.spares[n-1] = nil
	o.spares = o.spares[:n-1]
	return b
}

// dropSpares lets go of the spare buffers (the batches are small again).
func (o *outbox) dropSpares() {
	clear(o.spares)
	o.spares = o.spares[:0]
}

// markDurable records the peer's word that every batch up to seq is
// durable. It reports whether that is news, and, when it answers the
// oldest sync request outstanding, when that request was sent (zero
// otherwise).
func (o *outbox) markDurable(seq uint64) (moved bool, asked time.Time) {
	moved = seq > o.durable
	if moved {
		o.durable = seq
	}
	if !o.syncAsked.IsZero() && seq >= o.syncAskedSeq {
		asked = o.syncAsked
		o.syncAsked = time.Time{}
	}
	return moved, asked
}

// askSync asks for every batch up to seq to be made durable. It reports
// whether that is a new request: the sender must be woken to send it.
func (o *outbox) askSync(seq uint64) bool {
	if o.syncReq >= seq {
		return false
	}
	o.syncReq = seq
	return true
}

// after appends to into the batches numbered after sent, in order.
func (o *outbox) after(sent uint64, into []sentBatch) []sentBatch {
	for _, b := range o.batches {
		if b.seq > sent {
			into = append(into, b)
		}
	}
	return into
}

// sendCursor is what one connection's sender has written: batches up to
// sent, a sync request up to syncSent, the lazy requests counted up to
// lazySent.
type sendCursor struct {
	sent, syncSent, lazySent uint64
}

// sendWork is what the sender is to write next: the batches, then a sync
// request up to syncTo (0: none) once the batches up to it are written,
// a lazy sync request, and the resync's end (done) once the batches up
// to its Seq are written.
type sendWork struct {
	batches []sentBatch
	syncTo  uint64
	lazy    bool
	done    *wire.Frame
}

// pending fills w with what the sender at cur is to write, and reports
// whether any of it can be written now; if not, the sender waits and
// asks again with the same w. A lazy request is counted as written by
// cur as soon as it is handed out.
func (o *outbox) pending(cur *sendCursor, w *sendWork) bool {
	w.batches = o.after(cur.sent, w.batches)
	if o.syncReq > cur.syncSent {
		w.syncTo = o.syncReq
	}
	if o.lazy != cur.lazySent {
		w.lazy, cur.lazySent = true, o.lazy
	}
	if o.doneReq != nil && !o.doneSent {
		w.done = o.doneReq
	}
	// The resync's end goes after w.batches, which hold every batch
	// numbered up to it that the peer may lack: the others were applied
	// (up to the welcome's count, where the sender began) or dropped with
	// a lost session, which the resync stands for, and a batch queued
	// later is numbered after it. It waited for a batch numbered up to it
	// to be written on the connection: one resumed below it with those
	// batches dropped never sent it, and the resync never ended on an
	// idle primary (TestResyncEndResentAfterReconnectBelowIt, from a
	// review).
	return len(w.batches) > 0 || w.lazy || w.syncTo != 0 && w.syncTo <= cur.sent || w.done != nil
}

// syncSent records that a sync request for every batch up to seq was
// written at at (for latency.SyncRTT: the oldest one not answered).
func (o *outbox) syncSent(seq uint64, at time.Time) {
	if o.syncAsked.IsZero() {
		o.syncAsked, o.syncAskedSeq = at, seq
	}
}

// askLazy asks for a sync of everything acknowledged, in the background
// of the peer's applying (see keeper).
func (o *outbox) askLazy() { o.lazy++ }

// wrote counts n bytes of batches written to a connection.
func (o *outbox) wrote(n int) { o.wireBytes += uint64(n) }

// resyncBegins forgets the end of an earlier resync: a new one is built.
func (o *outbox) resyncBegins() { o.doneReq, o.doneSent = nil, false }

// resyncEnds queues the frame that ends a resync (f.Seq is its last
// batch): the sender writes it after every batch up to f.Seq still
// queued (pending), and again on each later connection, until the session is lost (drop)
// or another resync begins.
func (o *outbox) resyncEnds(f *wire.Frame) { o.doneReq = f }

// connect begins a connection: no sync request is outstanding on it,
// and a resync's end not yet acknowledged is sent again.
func (o *outbox) connect() {
	o.syncAsked = time.Time{}
	o.doneSent = false
}

// drop forgets the batches not acknowledged and the resync's end: the
// session they were sent in is lost (see Primary.sessionLost).
func (o *outbox) drop() {
	for _, b := range o.batches {
		o.unpin(b)
	}
	o.batches, o.bytes = nil, 0
	o.doneReq = nil
}
