package replica

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/wire"
)

// Tuning of the primary's pipeline.
const (
	batchWindow = 2 * time.Millisecond
	// eagerAfterBarrier: for this long after a durability call the
	// builder takes records without the batch window.
	eagerAfterBarrier = 10 * time.Millisecond
	retryBackoff      = 500 * time.Millisecond
	// refusedBackoff bounds the wait between attempts while the peer
	// refuses to apply (disk full, a path it cannot create): a peer that
	// cannot apply is backed off, not hammered.
	refusedBackoff = 30 * time.Second
	// divergedEvery spaces the comparisons begun by refusals that say
	// the peer's copy does not fit, while none of them could end: a
	// comparison of a big tree is dear, and one whose own batches are
	// refused will not mend the copy.
	divergedEvery = 5 * time.Minute
)

// Bounds of the memory the pipeline holds, variables for the tests that
// measure the rest of the primary's memory.
var (
	// batchRaw: uncompressed ops per batch.
	batchRaw = 4 << 20
	// maxUnacked bounds the compressed bytes in flight: building waits
	// beyond it. Sixteen full batches keep the peer busy (at 1 Gbit/s,
	// half a second of sending); every byte of it is the primary's
	// memory.
	maxUnacked = 64 << 20
)

// Primary ships one directory's changes to the peer.
type Primary struct {
	Dir  Dir
	Peer string
	Link *peerlink.Link
	Log  *slog.Logger
	// Dev is the watched filesystem in kernel encoding (capture.KernelDev).
	Dev uint32
	// OnAck, if set, gets the replication lag of every acknowledged
	// batch: from the capture of its oldest change to the peer's ack.
	// Called with the primary's lock held: it must not call back.
	OnAck func(lag time.Duration)
	// OnResyncDone, if set, is called once the peer acknowledged the end
	// of a resync: its copy is in sync from then on (Streaming). Called
	// without the primary's lock.
	OnResyncDone func()
	// Stages, if set, times the steps of durability calls (WaitShipped)
	// and the peer's answers to sync requests.
	Stages *latency.Stages
	// Epoch, if set, is this node's cluster epoch, sent in each
	// connection's hello: a replica whose copy is newer and not stale
	// refuses the stream (Server.Admit).
	Epoch func() uint64

	// DiskCheck, if set, says whether this copy's filesystem works now
	// (nil); it is asked before a connection and before a resync, which
	// would otherwise read a failed disk and mark the peer's copy as
	// being rewritten: the peer, in sync, could then not take the role
	// over (a resync after reads failed with EIO on a shut-down XFS; the
	// campaign's disk-fails-primary). An error puts the connection off;
	// DiskCheck calls DiskFailed when the disk failed for good. It must
	// return when ctx ends.
	DiskCheck  func(ctx context.Context) error
	diskFailed atomic.Bool
	// resyncStep (tests) is told a resync's steps as they happen: "scanned"
	// when its scan of this tree is done, "asked" when it sends the peer
	// a manifest request (which marks the peer's copy as being rewritten).
	resyncStep func(step string)
	// asidePass, if set, runs before a pass that has asides to remove
	// (tests: a pass that comes late).
	asidePass func()

	root     *os.File
	session  uint64
	readBuf  []byte       // the builders' read buffer, used by the build goroutine only
	barriers atomic.Int32 // WaitShipped calls in progress
	// lastBarrier is when the last WaitShipped ended (unix ns): a writer
	// that makes durability calls now will most likely make another.
	lastBarrier atomic.Int64
	// barrierKick cuts the batch window short when a barrier begins.
	barrierKick chan struct{}

	mu sync.Mutex
	// Three conditions on mu, so that a wake-up reaches only who waits
	// for it: work for the builder (journal, backpressure), sendq for the
	// sender (new batches), done for barriers (acks, passes).
	work, sendq, done *sync.Cond
	// closed: the term ended (Close); waiting calls fail with ErrClosed.
	closed   bool
	j        *journal.Journal
	sh       *shadow
	syncSeq  uint64 // capture sequence before the shadow's scan
	needFull bool
	// out is the ship stage: the batches built and not yet acknowledged,
	// what the peer acknowledged, and the sync requests (outbox.go).
	out       outbox
	connected bool
	// dropConn ends the current connection (nil without one), saying
	// why: the cluster knows the peer does not get what this node sends,
	// which TCP may not notice for minutes (see Drop).
	dropConn context.CancelCauseFunc
	// sentBound is the highest batch number the connection's peer may
	// acknowledge: what it held at the welcome, then each batch as the
	// sender is about to write it. An acknowledgement beyond it names a
	// batch the peer never got (a hostile peer, or a bug): taken, it
	// dropped batches never sent and counted them durable for the rest
	// of the term, honest peers' sessions included (a review:
	// TestForgedAckBeyondSentRefused).
	sentBound    uint64
	building     bool
	lastErr      string
	barrierCount uint64
	barrierNs    int64
	lastErrAt    time.Time
	fullSyncs    int
	// lostSessions counts the connections that could not resume: the
	// batches the peer had not made durable were dropped (sessionLost).
	lostSessions int
	// asides are the names the last pass kept inodes under on the peer:
	// the next pass removes those it does not claim (removeAsides). A
	// resync, which replaces the shadow, forgets them (the peer's are
	// entries only it has then, which the resync removes).
	asides []asideLink
	// divergedResyncs counts the full comparisons begun because the peer
	// refused a batch its tree did not fit (wire.FlagDiverged).
	divergedResyncs int
	// stuckMarks counts the files whose capture marks were found stuck
	// (StuckMarks).
	stuckMarks uint64
	// resyncsEnded counts the resyncs the peer confirmed (finishResync);
	// divergedEnded and divergedAt are that count and the time when the
	// last comparison begun by a divergence was asked for.
	resyncsEnded  int
	divergedEnded int
	divergedAt    time.Time
	fullSyncEnd   uint64 // last batch of the latest full sync
	dataBytes     uint64
	dropped       uint64 // changes tried too long and handed to a resync (see maxRetries)
	refused       string // why the peer refused the last connection's batch, until one is acknowledged
	changedBytes  uint64
	records       uint64
	// added counts what was folded into the journal (records, rescans).
	// cover is the last pass that took every change up to a count in
	// whole (nothing requeued): once its last batch is durable, the peer
	// holds every change counted up to there (marks.go).
	added uint64
	cover cover
	// pendingSince is when the oldest change still in the journal was
	// captured (zero: none).
	pendingSince time.Time

	// The modification bitmap and the copy's lineage (see Meta).
	dirty    *dirtySet
	lin      lineage // which copy the peer holds, and what the bitmap is worth (lineage.go)
	meta     *MetaStore
	forceAll bool // the next resync compares everything (duet resync --full)
	rs       ResyncStatus
	rsSent   atomic.Uint64 // bytes the resync in progress has read for sending
	rsSince  time.Time     // capture time of the oldest change the resync in progress took over
	// fullAsked counts the requests for a resync (needFull set: changes
	// lost, a session lost, a pass cut short, the operator); rsAsked is
	// its value when the resync in progress planned. A request made
	// after that is not covered by that resync, whose scan may have read
	// a file before the change the request stands for: its end leaves
	// the request standing (TestRescanAllDuringResyncIsKept).
	fullAsked, rsAsked uint64
	// readUntil is when Run's context ended: the capture was read until
	// then at most (SaveDirty).
	readUntil time.Time
	// rsReport is what the resyncs since the last that ended discarded
	// on the peer (resyncQueued).
	rsReport []string
	welcome  wire.Welcome // the peer's, on the current connection
	term     Term
	// marks tell the bitmap what the peer made durable (marks.go).
	marks durableMarks
	// forgetKeys are the kernel chunk marks of changes recorded while no
	// peer is connected, to drop soon (see forgetLoop).
	forgetKeys []capture.CaptureChunkKey
}

// sessionLost drops what was shipped on a session the peer cannot resume
// (it restarted, or lost what it had not made durable): the batches not
// acknowledged durable, and the marks of the passes and resync files in
// them. Batch numbers go on from the lost ones, so those marks would
// count as durable as soon as the next session's batches were, and the
// bitmap would forget changes that reached the peer in no batch (the
// modification marks, the moved and blind ones); a durability call whose
// pass was in them would return on the next session's acks
// (TestLostSessionForgetsItsMarks, TestBarrierOfLostSessionWaitsForResync).
// What the peer made durable is forgotten first. Called with p.mu held.
func (p *Primary) sessionLost() {
	p.clearDirty(true)
	p.marks.forget()
	// What a pass covered is what the peer made durable now: a resync
	// that requeues something leaves the cover as it was, and a call
	// would count itself covered by a lost batch again
	// (TestBarrierOfLostSessionBlockedResync).
	p.cover.resetTo(p.marks.newest)
	p.needFull = true
	p.fullAsked++
	p.out.drop()
	p.asides = nil
	p.lostSessions++
}

// NewPrimary opens dir for shipping.
func NewPrimary(d Dir, peer string, lk *peerlink.Link, dev uint32, log *slog.Logger) (*Primary, error) {
	root, err := fstree.OpenRoot(d.Path)
	if err != nil {
		return nil, err
	}
	var sb [8]byte
	rand.Read(sb[:])
	p := &Primary{Dir: d, Peer: peer, Link: lk, Dev: dev, Log: log.With("dir", d.Name),
		root: root, session: binary.LittleEndian.Uint64(sb[:]) | 1, j: journal.New(), needFull: true, out: newOutbox(),
		barrierKick: make(chan struct{}, 1), dirty: newDirtySet()}
	p.work, p.sendq, p.done = sync.NewCond(&p.mu), sync.NewCond(&p.mu), sync.NewCond(&p.mu)
	return p, nil
}

// Record folds one capture record in. Safe for concurrent use.
func (p *Primary) Record(r *capture.Record, now time.Time) {
	p.mu.Lock()
	p.j.Add(r, now)
	p.records++
	p.added++
	p.dirty.record(r, p.added)
	if p.sh == nil && r.Kind != capture.KindData && r.Kind != capture.KindMmap && r.Kind != capture.KindPreop {
		p.dirty.setBlind(r.Ino, p.added)
	}
	if !p.connected && (r.Kind == capture.KindData || r.Kind == capture.KindMmap) && r.Len > 0 && r.Len < journal.Unbounded &&
		len(p.forgetKeys) < maxForget {
		for c := r.Pos >> capture.ChunkShift; c <= (r.Pos+r.Len-1)>>capture.ChunkShift; c++ {
			p.forgetKeys = append(p.forgetKeys, capture.CaptureChunkKey{Dev: r.Dev, Ino: r.Ino, Chunk: c})
		}
	}
	if p.pendingSince.IsZero() {
		p.pendingSince = now
	}
	if (r.Kind == capture.KindData || r.Kind == capture.KindMmap) && r.Len < journal.Unbounded {
		p.changedBytes += r.Len
	}
	p.mu.Unlock()
	p.work.Broadcast()
}

// resyncGivenUp hands the changes a pass tried too long to a resync: each
// file is marked changed whole in the bitmap (a pass that is made durable
// later does not clear it) and a resync is asked for, which compares it
// wherever it is now. Until that resync ends the peer is not in sync.
// p.mu held.
func (p *Primary) resyncGivenUp(gave []gaveUp) {
	if len(gave) == 0 {
		return
	}
	for _, g := range gave {
		p.added++
		p.dirty.rescan(g.key.Ino, p.added)
	}
	p.dropped += uint64(len(gave))
	p.needFull = true
	p.fullAsked++
	// Without a trusted bitmap, only a comparison of every file is sure
	// to include them.
	p.forceAll = p.forceAll || !p.lin.trusted
	p.Log.Warn("changes could not be shipped after retries: resynchronising the peer, which is not in sync until then",
		"changes", len(gave), "first_ino", gave[0].key.Ino, "why", gave[0].why, "total", p.dropped)
}

// errDiskFailed: this copy's filesystem failed (DiskCheck, DiskFailed).
var errDiskFailed = errors.New("this copy's disk failed: no connection or resync from it")

// DiskFailed records that this copy's filesystem failed: no connection
// or resync starts from it again, its sync point no longer moves, and a
// resync that ends does not clear its Crashed mark (what the filesystem
// held unwritten is lost, and the peer may have it).
func (p *Primary) DiskFailed() {
	p.diskFailed.Store(true)
	p.wake()
}

// diskGone says why no connection or resync may start from this copy
// now (nil: one may): its filesystem failed (DiskFailed), or DiskCheck
// says so. Not called with p.mu held (DiskCheck syncs a directory).
func (p *Primary) diskGone(ctx context.Context) error {
	if p.diskFailed.Load() {
		return errDiskFailed
	}
	if p.DiskCheck != nil {
		if err := p.DiskCheck(ctx); err != nil {
			if p.diskFailed.Load() {
				return errDiskFailed
			}
			return fmt.Errorf("this copy's disk did not pass its check: %w", err)
		}
	}
	return nil
}

// Rescan asks for a whole-file comparison of one inode (its record was lost).
func (p *Primary) Rescan(k capture.InodeKey) {
	p.mu.Lock()
	p.j.MarkRescan(k)
	p.added++
	p.dirty.rescan(k.Ino, p.added)
	if p.pendingSince.IsZero() {
		p.pendingSince = time.Now()
	}
	p.mu.Unlock()
	p.work.Broadcast()
}

// Quiet reports whether nothing this primary took from the capture is
// left to forget the in-flight marks of: its journal is empty, and no
// pass or resync is running (they forget the marks of what they took).
func (p *Primary) Quiet() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.j.Pending() == 0 && !p.building && !p.rs.Active && len(p.asides) == 0
}

// StuckMarks is told of the inodes whose capture marks stayed set with
// nothing left to forget them (a bug: their changes emitted no record
// since), once the marks are gone: each is rescanned, as after a lost
// record, and counted.
func (p *Primary) StuckMarks(keys []capture.InodeKey) {
	p.mu.Lock()
	p.stuckMarks += uint64(len(keys))
	p.mu.Unlock()
	for _, k := range keys {
		p.Rescan(k)
	}
}

// RescanAll asks for a full comparison with the peer: changes were lost,
// the bitmap is incomplete until it ends.
//
// It counts as a change (p.added), as Rescan does: a durability call whose
// write is in a lost record counts it in its target, and waits for the
// comparison's pass to cover it. Without it the call's target was what an
// earlier pass had covered, and a comparison that requeued any change left
// that cover standing: the call returned on a batch long durable, with the
// comparison's batches (the lost write among them) not on the peer
// (TestBarrierAfterLostRecordsWaitsForRescanAll).
func (p *Primary) RescanAll() {
	p.mu.Lock()
	p.needFull, p.forceAll = true, true
	p.fullAsked++
	p.dirty.lost = true
	p.added++
	p.mu.Unlock()
	p.work.Broadcast()
}

// Resync asks for a resync with the peer now: what the bitmap and the
// sync points call for, or (full) a comparison of every file.
func (p *Primary) Resync(full bool) {
	p.mu.Lock()
	p.needFull = true
	p.fullAsked++
	p.forceAll = p.forceAll || full
	p.mu.Unlock()
	p.work.Broadcast()
}

// Run connects to the peer and ships changes until ctx ends, reconnecting
// after failures. kernel may be nil (no capture: full syncs only).
func (p *Primary) Run(ctx context.Context, kernel Kernel) {
	go func() {
		<-ctx.Done()
		// The term ends: its capture stops being read now, and a change
		// from here on may be in no record read (see SaveDirty).
		p.mu.Lock()
		p.readUntil = time.Now()
		p.mu.Unlock()
		p.wake()
	}()
	go p.keeper(ctx, kernel)
	go p.forgetLoop(ctx, kernel)
	var lastLog time.Time
	var lastMsg string
	backoff := retryBackoff
	for ctx.Err() == nil {
		err := p.connection(ctx, kernel)
		if ctx.Err() != nil {
			return
		}
		var refused *PeerRefusedError
		if errors.As(err, &refused) {
			backoff = min(2*backoff, refusedBackoff)
		} else {
			backoff = retryBackoff
		}
		p.mu.Lock()
		p.lastErr, p.lastErrAt = err.Error(), time.Now()
		p.refused = ""
		if refused != nil {
			p.refused = refused.Reason
		}
		resync := p.compareAllAfter(refused, time.Now())
		p.mu.Unlock()
		if resync {
			p.Log.Warn("the peer's copy differs from what the batch it refused expects: comparing every file with it", "peer", p.Peer, "batch", refused.Batch, "reason", refused.Reason)
		}
		// One line per new failure, then a reminder every 30s: retries
		// every half second must not flood the log.
		if err.Error() != lastMsg || time.Since(lastLog) > 30*time.Second {
			p.Log.Warn("replication link down, retrying", "peer", p.Peer, "err", err, "retry_in", backoff)
			lastLog, lastMsg = time.Now(), err.Error()
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
	}
}

func (p *Primary) dial(ctx context.Context) (net.Conn, wire.Welcome, error) {
	d := &net.Dialer{Timeout: 3 * time.Second, KeepAlive: 5 * time.Second}
	h := wire.Hello{Purpose: wire.PurposeReplicate, Session: p.session, Dir: p.Dir.Name}
	if p.Epoch != nil {
		h.Epoch = p.Epoch()
	}
	c, w, err := dialPeer(ctx, p.Link, d, p.Peer, h)
	if err != nil {
		return nil, w, err
	}
	c.SetDeadline(time.Time{})
	return c, w, nil
}

// dialPeer connects to the peer over lk and runs the handshake, within
// 10 s; the connection keeps that deadline.
func dialPeer(ctx context.Context, lk *peerlink.Link, d *net.Dialer, peer string, h wire.Hello) (net.Conn, wire.Welcome, error) {
	c, err := lk.Dial(ctx, d, peer)
	if err != nil {
		return nil, wire.Welcome{}, err
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	w, err := wire.ClientHandshake(c, lk.Keys(), h)
	if err != nil {
		c.Close()
		// Under TLS 1.3 a client hears that the server refused its
		// certificate only here, at its first read.
		return nil, w, peerlink.Explain(err)
	}
	return c, w, nil
}

// connection runs one connection: resume or full sync, then stream.
func (p *Primary) connection(ctx context.Context, kernel Kernel) error {
	if err := p.diskGone(ctx); err != nil {
		return err
	}
	c, w, err := p.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	cctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	// The goroutines below wait on conditions until cctx ends. Run's
	// wake-up when ctx ends is not enough: ctx's Done is closed before
	// cctx's Err is set, so a goroutine woken by it may see cctx live and
	// wait again, for ever (stopPrimary then hangs).
	defer context.AfterFunc(cctx, p.wake)()

	p.mu.Lock()
	// Resume only when the peer holds everything it acknowledged in this
	// session; otherwise compare the trees again.
	resumable := !p.needFull && w.Session == p.session && w.Applied >= p.out.acked
	if resumable && w.Applied > p.out.last() {
		// More than was ever built in this session: not a copy to
		// resume (TestForgedAckBeyondSentRefused).
		p.Log.Warn("the peer says it applied batches never built here: comparing the trees again", "peer_applied", w.Applied, "last_built", p.out.last())
		resumable = false
	}
	from := w.Applied
	if resumable {
		p.ack(w.Applied)
	} else {
		p.sessionLost()
		// The peer starts this session afresh, and nothing queued before
		// is sent (sessionLost dropped it): the sender is past every
		// batch numbered so far. From 0, it waited for a batch numbered
		// up to the last one of the lost session before it sent a
		// resync's end numbered so, and a resync that queued nothing
		// (nothing changed meanwhile) never ended: the peer stayed
		// inconsistent, unable to take over, on an idle primary
		// (TestEmptyResyncAfterLostSessionEnds, from a review).
		from = p.out.last()
	}
	p.connected = true
	p.dropConn = cancel
	p.sentBound = from
	p.welcome = w
	p.out.connect()
	p.mu.Unlock()
	manifest := make(chan wire.Frame, 16)
	p.Log.Info("replication connected", "peer", p.Peer, "resume", resumable, "peer_applied", w.Applied)
	defer func() {
		p.mu.Lock()
		p.connected = false
		p.dropConn = nil
		p.mu.Unlock()
		p.wake()
	}()

	errc := make(chan error, 3)
	go func() { errc <- p.readAcks(cctx, c, manifest) }()
	go func() { errc <- p.writeBatches(cctx, c, from, w.Sealed && peerlink.Sealed(c)) }()
	go func() { errc <- p.build(cctx, c, kernel, manifest) }()
	err = <-errc
	if cctx.Err() != nil && ctx.Err() == nil {
		err = fmt.Errorf("connection ended: %w", context.Cause(cctx))
	}
	// Every goroutine of this connection is gone before the next one
	// starts: none may act on a later connection's state.
	cancel(nil)
	c.Close()
	p.wake()
	<-errc
	<-errc
	return err
}

// wake wakes every waiter. Taking the lock orders it after any waiter's
// check of its condition, so no wake-up is lost.
func (p *Primary) wake() {
	p.mu.Lock()
	p.work.Broadcast()
	p.sendq.Broadcast()
	p.done.Broadcast()
	p.mu.Unlock()
}

// readAcks consumes the peer's acknowledgements and errors.
func (p *Primary) readAcks(ctx context.Context, c net.Conn, manifest chan<- wire.Frame) error {
	br := bufio.NewReader(c)
	for {
		f, err := wire.ReadFrame(br, nil)
		if err != nil {
			return fmt.Errorf("reading from peer: %w", err)
		}
		switch f.Type {
		case wire.TypeAck:
			p.mu.Lock()
			if bound := p.sentBound; f.Seq > bound {
				p.mu.Unlock()
				return fmt.Errorf("the peer acknowledged batch %d, beyond the last sent to it (%d): a protocol error, its acknowledgements are not taken", f.Seq, bound)
			}
			p.ack(f.Seq)
			if f.Flags&wire.FlagDurable != 0 {
				moved, asked := p.out.markDurable(f.Seq)
				if moved {
					p.clearDirty(false)
				}
				if !asked.IsZero() {
					p.Stages.Since(latency.SyncRTT, asked)
				}
			}
			p.mu.Unlock()
			if f.Flags&wire.FlagResyncDone != 0 {
				p.finishResync(f.Seq)
			}
			p.work.Broadcast()
			p.done.Broadcast()
		case wire.TypeManifest, wire.TypeEnd:
			select {
			case manifest <- f:
			case <-ctx.Done():
				return ctx.Err()
			}
		case wire.TypeError:
			return &PeerRefusedError{Reason: refusal(f.Payload), Batch: f.Seq, Diverged: f.Flags&wire.FlagDiverged != 0}
		default:
			return fmt.Errorf("unexpected %s from peer", f.Type)
		}
	}
}

// peerEntriesFloor is the fewest entries a peer's manifest may list; see
// peerEntriesLimit.
var peerEntriesFloor = 16 << 20

// peerEntriesLimit bounds the entries of a peer's manifest for a tree of
// local entries here: each frame is bounded, their number was not, and a
// peer that sent frames without end held the primary's memory without
// bound (a review: TestPeerManifestBounded). A copy may list more than
// this one (files removed here while the peer was away): four times as
// many, and never fewer than peerEntriesFloor, about 2 GB of listing.
func peerEntriesLimit(local int) int {
	return max(4*local, peerEntriesFloor)
}

// maxRefusal bounds the peer's reason for refusing, as kept in the status
// and logged: a frame's payload may be 64 MiB (a review).
const maxRefusal = 4096

// refusal is the peer's reason, cut to maxRefusal bytes.
func refusal(b []byte) string {
	if len(b) <= maxRefusal {
		return strings.ToValidUTF8(string(b), "?")
	}
	return strings.ToValidUTF8(string(b[:maxRefusal]), "?") + fmt.Sprintf("... (%d bytes)", len(b))
}

// compareAllAfter asks for a comparison of every file after the peer
// refused a batch (refused, nil if it did not) because its copy is not
// what the stream expects (a change made there, a bug): the batch would
// be refused for ever, and what else differs is unknown
// (TestPeerThatDivergedIsResynced). Once a comparison begun so has
// ended (the peer confirmed it: queued, its batches may still be
// refused), a later refusal begins another at once; while none has, one
// every divergedEvery. It says whether it asked.
// Called with p.mu held.
func (p *Primary) compareAllAfter(refused *PeerRefusedError, now time.Time) bool {
	if refused == nil || !refused.Diverged || p.needFull && p.forceAll {
		return false
	}
	if p.divergedResyncs > 0 && p.resyncsEnded <= p.divergedEnded && now.Sub(p.divergedAt) < divergedEvery {
		return false
	}
	p.needFull, p.forceAll = true, true
	p.fullAsked++
	p.divergedResyncs++
	p.divergedEnded, p.divergedAt = p.resyncsEnded, now
	return true
}

// PeerRefusedError is the peer's refusal of the replication stream: it
// could not apply a batch (its disk is full, a path it cannot create) or
// does not take replication now. The batch stays here; the primary backs
// off before it tries again.
type PeerRefusedError struct {
	Reason string
	// Batch is the batch refused (0 if none, or from a peer before the
	// field); Diverged says the peer's tree is not what it expects
	// (wire.FlagDiverged): sent again, it would be refused again.
	Batch    uint64
	Diverged bool
}

func (e *PeerRefusedError) Error() string { return "peer cannot apply: " + e.Reason }

// Drop ends the connection in progress because the cluster knows the
// peer does not get what it sends (why): it was declared lost, or it does
// not hear this node. A crashed host sends no FIN, and frames lost on
// their way keep TCP retransmitting: the connection would otherwise look
// alive, holding durability calls, until TCP gives up minutes later.
// Reconnection attempts go on.
func (p *Primary) Drop(why string) {
	p.mu.Lock()
	drop := p.dropConn
	p.mu.Unlock()
	if drop != nil {
		p.Log.Info("ending the replication connection: "+why, "peer", p.Peer)
		drop(errors.New(why))
	}
	p.wake()
}

// Wake re-evaluates every waiting durability call: what the cluster knows
// of the peer changed (see Release).
func (p *Primary) Wake() { p.wake() }

// ack drops acknowledged batches. Called with p.mu held.
func (p *Primary) ack(seq uint64) {
	if p.out.ack(seq, time.Now(), p.OnAck) {
		p.refused = ""
	}
}

// writeBatches sends queued batches after `from`, in order, and the sync
// requests of barriers once the batches they cover are sent. sealed: the
// connection is TLS and the peer accepts sealed frames; otherwise the
// batches made sealed (see batcher.flush) go out with their CRC.
func (p *Primary) writeBatches(ctx context.Context, c net.Conn, from uint64, sealed bool) error {
	w := &coalescer{c: c}
	cur := sendCursor{sent: from}
	for {
		p.mu.Lock()
		var todo sendWork
		for ctx.Err() == nil && !p.out.pending(&cur, &todo) {
			p.sendq.Wait()
		}
		// The frames are held while they are written: the peer may
		// acknowledge one before its Write returns, and its buffer must
		// not be built into meanwhile (frameBuf).
		for _, b := range todo.batches {
			p.out.pin(b)
			// Before it is written: the peer may acknowledge it at once.
			p.sentBound = max(p.sentBound, b.seq)
		}
		if todo.done != nil {
			// A resync's end stands for the batches a lost session
			// dropped: the peer acknowledges it with its own number.
			p.sentBound = max(p.sentBound, todo.done.Seq)
		}
		p.mu.Unlock()
		next, syncTo, done := todo.batches, todo.syncTo, todo.done
		for k, b := range next {
			// The frame is let go as soon as it is written: the peer
			// may acknowledge it while the rest are, and next would
			// keep it until the last is sent.
			next[k] = sentBatch{}
			var err error
			frame := b.frame
			if ctx.Err() != nil {
				err = ctx.Err()
			} else {
				if !sealed {
					frame = wire.Unsealed(frame)
				}
				err = w.write(frame)
			}
			p.mu.Lock()
			p.out.unpin(b)
			if err != nil {
				for _, r := range next[k+1:] {
					p.out.unpin(r)
				}
				p.mu.Unlock()
				if ctx.Err() != nil {
					return ctx.Err()
				}
				return fmt.Errorf("sending batch %d: %w", b.seq, err)
			}
			p.out.wrote(len(frame))
			p.mu.Unlock()
			cur.sent = b.seq
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if syncTo != 0 && syncTo <= cur.sent {
			at := time.Now()
			if err := w.frame(&wire.Frame{Type: wire.TypeSync, Seq: syncTo}); err != nil {
				return fmt.Errorf("sending sync request: %w", err)
			}
			cur.syncSent = syncTo
			p.mu.Lock()
			p.out.syncSent(syncTo, at)
			p.mu.Unlock()
		}
		if todo.lazy {
			if err := w.frame(&wire.Frame{Type: wire.TypeSync, Flags: wire.FlagLazy, Seq: cur.sent}); err != nil {
				return fmt.Errorf("sending sync request: %w", err)
			}
		}
		if done != nil {
			// Every batch of the resync the peer may lack is sent
			// (pending): the peer syncs them and records that its copy
			// follows this term's generation.
			if err := w.frame(done); err != nil {
				return fmt.Errorf("sending the end of the resync: %w", err)
			}
			p.mu.Lock()
			p.out.doneSent = true // until the next connection (connect)
			p.mu.Unlock()
		}
		// Sent before waiting again: a barrier waits for the sync
		// request.
		if err := w.flush(); err != nil {
			return fmt.Errorf("sending to peer: %w", err)
		}
	}
}

// coalesceMax bounds the frames a coalescer gathers for one write.
const coalesceMax = 64 << 10

// coalescer gathers the small frames of one pass of writeBatches (a
// batch, its sync request) into one write: one TLS record and one
// segment, not one each. Every write to the connection holds whole
// frames, for the build goroutine writes its manifest requests between.
type coalescer struct {
	c   net.Conn
	buf []byte
}

func (w *coalescer) write(frame []byte) error {
	if len(w.buf)+len(frame) <= coalesceMax {
		w.buf = append(w.buf, frame...)
		return nil
	}
	if err := w.flush(); err != nil {
		return err
	}
	if len(frame) <= coalesceMax {
		w.buf = append(w.buf, frame...)
		return nil
	}
	w.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err := w.c.Write(frame)
	return err
}

func (w *coalescer) frame(f *wire.Frame) error {
	return w.write(wire.AppendFrame(nil, f))
}

func (w *coalescer) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	w.c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	_, err := w.c.Write(w.buf)
	w.buf = w.buf[:0]
	return err
}

// batcher encodes ops into frames queued for sending.
type batcher struct {
	p *Primary
	// ctx is the connection's: a batcher waiting for acknowledgements
	// (see flush) gives up when it ends.
	ctx    context.Context
	raw    []byte // HeaderSize bytes of room, then the batch's ops
	sample []byte // scratch for the compressibility test
	zbuf   []byte // scratch for the compressed frame
	small  int    // batches in a row not built in place (keepSmall)
	// verdict is asIs's, once the batch's sample is compressed: 0 not
	// yet, 1 compressed, 2 as it is; the next batch starts at 0.
	verdict int
	since   time.Time // capture time of the oldest change being batched
	debug   bool      // log every op (the log's level is debug)
}

// batchKeep is the most room a batcher keeps after a small batch.
const batchKeep = 256 << 10

// frameRoom is the room of the buffers big batches are built in and sent
// from (frameBuf): a read of readChunk after up to as much already
// batched, and the ops around it. Buffers of one size, so that any spare
// takes any batch.
const frameRoom = 2*readChunk + 64<<10

// inPlaceFrom is the size from which a batch built of small reads moves
// into a frameRoom buffer (a read of 128 KiB or more goes into one at
// once): below it the batch grows, and keeps, a buffer of its own and
// goes as an exact copy, which costs less than a frameRoom buffer of
// 2 MiB for a durability call's few hundred KiB (from a review).
const inPlaceFrom = 512 << 10

// keepSmall is how many batches in a row that are not built in place the
// batcher keeps its spare frames and its frameRoom buffer through.
const keepSmall = 64

// compressSample is how much of a batch is test-compressed first.
const compressSample = 64 << 10

func (bt *batcher) add(op *wire.Op) error {
	if bt.debug {
		bt.p.Log.Debug("shipping", "code", op.Code, "path", op.Path, "path2", op.Path2, "off", op.Off, "len", len(op.Data), "oplen", op.Len)
	}
	if cap(bt.raw) == frameRoom {
		// A batch that goes as it is, in a frameRoom buffer, goes
		// before an op that would grow the buffer (from a review).
		bt.flushIfFull(len(op.Path) + len(op.Path2) + len(op.Data))
	}
	if len(bt.raw) < wire.HeaderSize {
		// Room for the frame's header: a batch that goes as it is
		// becomes its frame in place (see flush).
		bt.raw = append(bt.raw[:0], make([]byte, wire.HeaderSize)...)
	}
	bt.raw = wire.AppendOp(bt.raw, op)
	bt.flushIfFull(0)
	return nil
}

// asIs reports whether the batch goes as it is, not compressed: it holds
// 2*compressSample bytes or more and its first compressSample bytes do
// not shrink by a sixteenth (already compressed, encrypted data). The
// sample is compressed once a batch: its first bytes do not change.
func (bt *batcher) asIs() bool {
	ops := len(bt.raw) - wire.HeaderSize
	if ops < 2*compressSample {
		return false
	}
	if bt.verdict == 0 {
		bt.sample = wire.Compress(bt.sample[:0], bt.raw[wire.HeaderSize:wire.HeaderSize+compressSample])
		bt.verdict = 1
		if len(bt.sample) >= compressSample*15/16 {
			bt.verdict = 2
		}
	}
	return bt.verdict == 2
}

// flushIfFull queues the batch once it holds batchRaw bytes, or once it
// goes as it is (asIs) and next more bytes would not fit in its frameRoom
// buffer (nor in one, if it is not in one yet): they begin the next
// batch, in a frameRoom buffer, instead of the runtime growing this one.
// A batch that is compressed grows to batchRaw: its frame is a copy
// anyway, and a sync of many small files fills 4 MiB batches (a version
// that cut them at the buffer's room sent 136 KiB batches, 23 times as
// many; from a review).
func (bt *batcher) flushIfFull(next int) {
	ops := len(bt.raw) - wire.HeaderSize
	if ops >= batchRaw {
		bt.flush()
		return
	}
	if next > 0 && cap(bt.raw)-len(bt.raw) < next+opSlack &&
		(cap(bt.raw) == frameRoom || len(bt.raw)+next+opSlack > frameRoom) && bt.asIs() {
		bt.flush()
	}
}

// opSlack bounds a write op's encoding beyond its path and data.
const opSlack = 128

// addRead adds a write op of up to n bytes of f at off to path, read
// straight into the batch (a sequential writer's megabytes are not copied
// once more through the builder's buffer). It returns how many bytes it
// read and the read's error: at the end of the file fewer, and with 0 no
// op is added. It does not queue the batch: the caller counts what it
// read first, then calls flushIfFull (which may wait for the peer), also
// before its next read.
func (bt *batcher) addRead(path string, f *os.File, off uint64, n int) (int, error) {
	if len(bt.raw) < wire.HeaderSize {
		bt.raw = append(bt.raw[:0], make([]byte, wire.HeaderSize)...)
	}
	if need := len(bt.raw) + len(path) + n + opSlack; cap(bt.raw) < need {
		compressed := len(bt.raw)-wire.HeaderSize >= 2*compressSample && !bt.asIs()
		big := n >= 2*compressSample || need-wire.HeaderSize >= inPlaceFrom
		if !big || compressed {
			// A small batch (the usual one of a durability call), one
			// of small reads under inPlaceFrom, or one that is
			// compressed grows its buffer as it needs (and keeps it).
			bt.raw = slices.Grow(bt.raw, need-len(bt.raw))
		} else {
			// A batch that may go as it is: a frameRoom buffer (a
			// spare if there is one) takes what is batched so far, and
			// the read.
			room := bt.spare()
			if cap(room) < need {
				room = slices.Grow(room, need)
			}
			bt.raw = append(room, bt.raw...)
		}
	}
	op := wire.Op{Code: wire.OpWrite, Path: path, Off: off}
	start := len(bt.raw)
	b := wire.AppendOpHeader(bt.raw, &op, n)
	data := len(b)
	got, err := f.ReadAt(b[data:data+n], int64(off))
	switch {
	case got == 0:
		bt.raw = b[:start]
		return 0, err
	case got < n:
		// The header announced n bytes: it is made again for got (its
		// length field is no longer), the data moved behind it.
		h := wire.AppendOpHeader(bt.raw[:start], &op, got)
		b = append(h, b[data:data+got]...)
	default:
		b = b[:data+n]
	}
	bt.raw = b
	if bt.debug {
		bt.p.Log.Debug("shipping", "code", op.Code, "path", path, "off", off, "len", got)
	}
	return got, err
}

func (bt *batcher) flush() {
	if len(bt.raw) <= wire.HeaderSize {
		return
	}
	ops := bt.raw[wire.HeaderSize:]
	// Data that does not compress (already compressed, encrypted) is sent
	// as it is: a sample of the batch decides, at a sixteenth of the cost.
	compress := !bt.asIs()
	bt.verdict = 0
	var frame []byte
	flags := uint16(0)
	// A big batch that goes as it is, built in a frameRoom buffer,
	// becomes its frame in place: the buffer is handed over, and the
	// next batch is built in a spare one (frameBuf). Any other frame is
	// a copy of its exact size.
	inPlace := !compress && cap(bt.raw) == frameRoom
	switch {
	case compress:
		flags = wire.FlagZstd
		bt.zbuf = wire.Compress(append(bt.zbuf[:0], make([]byte, wire.HeaderSize)...), ops)
		frame = append([]byte(nil), bt.zbuf...)
	case inPlace:
		frame = bt.raw
	default:
		frame = append([]byte(nil), bt.raw...)
	}
	p := bt.p
	// Over TLS, whose records are authenticated, a CRC32C of every byte
	// on both ends is work for nothing (wire.FlagSealed).
	sealed := p.Link != nil && !p.Link.Plaintext()
	p.mu.Lock()
	seq := p.out.number()
	if p.barriers.Load() > 0 {
		// A barrier waits, most likely for this batch: ask the peer to
		// sync it right behind it, before the barrier gets to ask.
		p.out.askSync(seq)
	}
	frame = wire.FrameIn(frame, &wire.Frame{Type: wire.TypeBatch, Flags: flags, Seq: seq}, sealed)
	var buf *frameBuf
	if inPlace {
		buf = &frameBuf{b: frame, refs: 1}
		bt.raw = p.out.spare() // or nil: addRead makes one when needed
		bt.small = 0
	} else {
		bt.small++
		if bt.small >= keepSmall {
			// Small batches since a burst: its spare frames are let go,
			// and the room it left in the batch buffer.
			p.out.dropSpares()
			bt.raw = letGo(bt.raw, len(bt.raw))
			bt.small = 0
		} else if cap(bt.raw) == frameRoom {
			bt.raw = bt.raw[:0]
		} else {
			bt.raw = letGo(bt.raw, len(bt.raw))
		}
		if compress {
			bt.zbuf = letGo(bt.zbuf, len(frame))
		}
	}
	since := bt.since
	if since.IsZero() {
		since = time.Now()
	}
	p.out.push(sentBatch{seq: seq, frame: frame, since: since, buf: buf})
	p.sendq.Broadcast()
	// A pass can read far more than maxUnacked (a resync reads the whole
	// tree): it waits here for the peer, or the queue would hold all it
	// read until the link had sent it.
	for bt.ctx.Err() == nil && p.out.full() {
		p.work.Wait()
	}
	p.mu.Unlock()
}

// spare returns a frameRoom buffer for the next batch: an acknowledged
// frame's, or a new one.
func (bt *batcher) spare() []byte {
	bt.p.mu.Lock()
	b := bt.p.out.spare()
	bt.p.mu.Unlock()
	if b == nil {
		b = make([]byte, 0, frameRoom)
	}
	return b
}

// letGo returns b emptied, or nil when it has room for big batches and
// used lets a small one follow (after a full sync or a burst): the room
// they grew (batchRaw, 4 MiB) is let go, not kept for as long as the
// connection lasts.
func letGo(b []byte, used int) []byte {
	if cap(b) > batchKeep && used < cap(b)/16 {
		return nil
	}
	return b[:0]
}

// build turns journal entries into batches while connected.
func (p *Primary) build(ctx context.Context, c net.Conn, kernel Kernel, manifest <-chan wire.Frame) error {
	bt := &batcher{p: p, ctx: ctx, debug: p.Log.Enabled(ctx, slog.LevelDebug)}
	shipped := attrCache{} // this connection's (see attrCache)
	if p.readBuf == nil {
		p.readBuf = make([]byte, readChunk)
	}
	for ctx.Err() == nil {
		p.mu.Lock()
		for ctx.Err() == nil && p.out.full() {
			p.work.Wait()
		}
		full := p.needFull
		p.mu.Unlock()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if full {
			if err := p.fullSync(ctx, c, kernel, bt, manifest); err != nil {
				return err
			}
			clear(shipped) // the full sync shipped attributes of its own
			// What the comparison held (both trees' listings and their
			// indexes, hundreds of bytes a file) is garbage now: handed
			// back to the system at once, the daemon does not keep the
			// comparison's peak for as long as it runs.
			debug.FreeOSMemory()
			continue
		}
		p.mu.Lock()
		// Names kept aside by the last pass go with the next one unless
		// it claims them: it runs at once.
		for ctx.Err() == nil && p.j.Pending() == 0 && !p.needFull && len(p.asides) == 0 {
			p.work.Wait()
		}
		p.mu.Unlock()
		// Let a burst of records gather into one batch, unless a
		// barrier is waiting or ended just now (a writer making
		// durability calls: its next one follows its next write within
		// microseconds, and the pass built meanwhile is one it need not
		// wait for); and make sure every record emitted so far is in the
		// journal: a directory must not be reconciled before the
		// allocation of an inode it holds.
		if p.barriers.Load() == 0 && time.Since(time.Unix(0, p.lastBarrier.Load())) > eagerAfterBarrier {
			p.batchWindow(ctx)
		}
		p.mu.Lock()
		hook := p.asidePass
		if len(p.asides) == 0 {
			hook = nil
		}
		p.mu.Unlock()
		if hook != nil {
			hook()
		}
		takeAt := time.Now()
		if kernel != nil {
			kernel.Drain() // short only when the term ends (ctx)
		}
		p.mu.Lock()
		if ctx.Err() != nil {
			// The connection ended while the pass waited: its records
			// stay in the journal for the next connection. A pass built
			// now would move the shadow past what the peer holds, and
			// the next resync trusts the shadow for the names the peer
			// was given (markBitmapCompared): a rotation captured just
			// after the peer left went unseen
			// (TestResyncAfterPeerAwayFindsRotatedDirectory, once in 50
			// runs, 4 in 150 with both CPUs busy).
			p.mu.Unlock()
			return ctx.Err()
		}
		files, mark := p.takePass(time.Now())
		asides := p.asides
		bt.since, p.pendingSince = p.pendingSince, time.Time{}
		p.building = true
		p.mu.Unlock()
		b := newBuilder(p.root, p.Dev, p.sh, kernel, bt, p.Log, p.readBuf)
		b.syncSeq = p.syncSeq
		b.shipped = shipped
		b.pendingAsides = slices.Clone(asides) // the builder renumbers them (renumberAsides), p.asides is read meanwhile
		requeue, err := b.build(files)
		blocked, beyondEOF := b.blocked, b.beyondEOF
		bt.flush()
		p.mu.Lock()
		p.asides = b.leftAsides()
		if bt.debug {
			p.Log.Debug("pass built", "records", len(files), "requeued", len(requeue), "asides_left", len(p.asides), "err", err)
		}
		p.building = false
		p.dataBytes += b.dataRead
		p.resyncGivenUp(b.gaveUp)
		p.noteMoved(b.moved, mark)
		p.requeue(requeue)
		if blocked > 0 && (p.pendingSince.IsZero() || bt.since.Before(p.pendingSince)) {
			// Changes made but not shipped yet are as old as before.
			// Bytes beyond EOF and operations in progress are not
			// changes yet: they do not age the lag.
			p.pendingSince = bt.since
		}
		if err == nil {
			p.coverPass(mark, files, requeue, blocked, beyondEOF, len(b.gaveUp) > 0, takeAt)
		} else {
			// Ended midway (no free aside name, a directory that
			// cannot be listed): the changes it took and did not ship
			// are in no journal now. A resync compares them (the
			// bitmap holds their marks) before anything resumes.
			p.needFull = true
			p.fullAsked++
		}
		p.mu.Unlock()
		p.done.Broadcast()
		if err != nil {
			return err
		}
		if len(requeue) > 0 || len(files) == 0 {
			// What was requeued needs time to become visible, unless a
			// durability call began meanwhile: it waits for the next
			// pass (a writer that appends and flushes, as a database's
			// binary log does, leaves bytes beyond EOF in nearly every
			// pass, and its calls waited out the window). A pass that
			// took nothing had only operations in progress pending
			// (preops, up to journal.PreopTimeout) or asides to remove:
			// passes back to back while calls came spun a CPU
			// (TestPendingPreopDoesNotSpinBuilder).
			p.batchWindow(ctx)
		}
	}
	return ctx.Err()
}

// takePass takes from the journal what a pass ships, and the count of
// changes it covers. Called with p.mu held.
func (p *Primary) takePass(now time.Time) ([]journal.File, uint64) {
	files := p.j.Take(now)
	mark := p.added
	p.holdKept()
	return files, mark
}

// dropForResync forgets the journal's changes that the resync about to
// read the files takes over (DropSettled), and returns them. Called with
// p.mu held, once the resync's mark is counted.
func (p *Primary) dropForResync() []journal.File {
	dropped := p.j.DropSettled()
	p.holdKept()
	return dropped
}

// requeue puts back in the journal what a pass or a resync could not
// ship. Not shipped, it must outlive the pass's mark, which may cover it
// yet (bytes beyond EOF do not block the cover: a review,
// TestS46bPassMarkClearsRequeuedBeyondEOF). Called with p.mu held.
func (p *Primary) requeue(files []journal.File) {
	if len(files) == 0 {
		return
	}
	p.added++
	for i := range files {
		p.j.Requeue(files[i])
		p.dirty.hold(&files[i], nil, p.added) // only what was put back: records since have later counts
	}
}

// holdKept is done once a pass (Take) or a resync (DropSettled) took
// what it ships and counted its mark (what it puts back later, requeue
// marks the same way): what the journal still holds
// (operations in progress; for a resync, files written through a shared
// mapping and changes requeued too) was not taken, yet its bitmap marks
// were counted before the mark, and the pass's or resync's marks, once
// durable on the peer, would forget them while no durable batch carried
// them. Lost with its session, or saved at a clean stop before the pass
// that ships it, the change was in no bitmap mark: the next resync
// trusted the bitmap and sent nothing (a review, forty-sixth session:
// TestResyncPassMarkClearsKeptJournalChange,
// TestPassMarkClearsPreopInProgress). Their marks are counted again,
// beyond the mark. Called with p.mu held.
func (p *Primary) holdKept() {
	if p.j.Pending() == 0 {
		return
	}
	p.added++
	p.j.Held(func(f *journal.File, ops []journal.Span) { p.dirty.hold(f, ops, p.added) })
}

// coverPass records what a pass that took the changes counted up to mark
// (at takeAt) and queued its batches covers: everything, unless it
// requeued changes (blocked; bytes beyond EOF only count for the calls
// begun before it read the files) or gave changes up to a resync, which
// covers them once it is queued (a cover left by such a pass let a call
// return on the pass's batch when the resync requeued anything:
// TestBarrierOfGivenUpChangeWaitsForResync). The files it shipped in
// full are done all the same. Called with p.mu held.
func (p *Primary) coverPass(mark uint64, files, requeue []journal.File, blocked, beyondEOF int, gaveUp bool, takeAt time.Time) {
	if blocked > 0 || gaveUp {
		p.marks.addFiles(files, requeue, mark, p.out.last())
		return
	}
	p.cover.set(mark, p.out.last(), beyondEOF > 0, takeAt)
	p.marks.addPass(passMark{mark: mark, seq: p.cover.seq, at: takeAt})
}

// batchWindow lets records gather for a while, or until a barrier begins
// and wants them shipped now.
func (p *Primary) batchWindow(ctx context.Context) {
	t := time.NewTimer(batchWindow)
	defer t.Stop()
	select {
	case <-t.C:
	case <-p.barrierKick:
	case <-ctx.Done():
	}
}

// Status is a primary directory's replication state.
type Status struct {
	Dir          string  `json:"dir"`
	Path         string  `json:"path"`
	Peer         string  `json:"peer"`
	Connected    bool    `json:"connected"`
	InSync       bool    `json:"in_sync"`
	Sent         uint64  `json:"batches_built"`
	Acked        uint64  `json:"batches_acked"`
	Unacked      int     `json:"batches_unacked"`
	UnackedBytes int     `json:"unacked_bytes"`
	PendingFiles int     `json:"pending_files"`
	LagMs        float64 `json:"lag_ms"`
	Records      uint64  `json:"records"`
	ChangedBytes uint64  `json:"changed_bytes"`
	DataBytes    uint64  `json:"data_bytes_read"`
	WireBytes    uint64  `json:"wire_bytes"`
	FullSyncs    int     `json:"full_syncs"`
	// DroppedChanges counts changes that could not be shipped after
	// retries: each was handed to a resync, and the peer was not in sync
	// until it ended.
	DroppedChanges uint64 `json:"dropped_changes"`
	// PeerCannotApply is why the peer refused the stream (its disk is
	// full...), until it acknowledges a batch again.
	PeerCannotApply string `json:"peer_cannot_apply,omitempty"`
	// DivergedResyncs counts the full comparisons begun because the peer
	// refused a batch that did not fit its tree (a change made on the
	// peer's copy, or a bug): each found and repaired what differed.
	DivergedResyncs int `json:"diverged_resyncs,omitempty"`
	// StuckMarks counts the files (inodes) whose capture marks were
	// found set with nothing left to forget them (a bug: their changes
	// were no longer captured): the marks forgotten, each rescanned.
	StuckMarks   uint64  `json:"stuck_marks,omitempty"`
	Barriers     uint64  `json:"barriers"`
	BarrierAvgMs float64 `json:"barrier_avg_ms"`
	LastError    string  `json:"last_error,omitempty"`
	LastErrorAt  string  `json:"last_error_at,omitempty"`
	// Mode and MaxLagMs are the directory's configuration (set by the
	// node): sync, or async with a lag bound.
	Mode     string  `json:"mode,omitempty"`
	MaxLagMs float64 `json:"max_lag_ms,omitempty"`
	// The copy's lineage and the modification bitmap (see Meta).
	Gen           string       `json:"gen,omitempty"`
	PeerGen       string       `json:"peer_copy_gen,omitempty"`
	BitmapBytes   uint64       `json:"bitmap_bytes"`
	BitmapFiles   int          `json:"bitmap_files"`
	BitmapTrusted bool         `json:"bitmap_trusted"`
	Resync        ResyncStatus `json:"resync"`
}

// Status reports the current state.
func (p *Primary) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := Status{Dir: p.Dir.Name, Path: p.Dir.Path, Peer: p.Peer, Connected: p.connected,
		Sent: p.out.last(), Acked: p.out.acked, Unacked: len(p.out.batches), UnackedBytes: p.out.bytes,
		PendingFiles: p.j.Pending(), Records: p.records, ChangedBytes: p.changedBytes,
		DataBytes: p.dataBytes, WireBytes: p.out.wireBytes, FullSyncs: p.fullSyncs, LastError: p.lastErr,
		DroppedChanges: p.dropped, PeerCannotApply: p.refused, DivergedResyncs: p.divergedResyncs, StuckMarks: p.stuckMarks}
	s.Barriers = p.barrierCount
	if p.barrierCount > 0 {
		s.BarrierAvgMs = float64(p.barrierNs) / float64(p.barrierCount) / 1e6
	}
	if p.lastErr != "" {
		s.LastErrorAt = p.lastErrAt.UTC().Format(time.RFC3339)
	}
	s.LagMs = float64(p.lag().Microseconds()) / 1000
	s.InSync = p.connected && !p.needFull && !p.building && p.out.empty() && s.PendingFiles == 0 && len(p.asides) == 0
	if p.lin.gen != 0 {
		s.Gen, s.PeerGen = fmt.Sprintf("%016x", p.lin.gen), fmt.Sprintf("%016x", p.lin.base)
	}
	s.BitmapBytes, s.BitmapFiles, s.BitmapTrusted = p.dirty.bytes(), len(p.dirty.files), p.lin.trusted
	s.Resync = p.rs
	if p.rs.Active {
		s.Resync.BytesSent = p.rsSent.Load()
		if el := time.Since(p.rs.Started).Seconds(); el > 0 {
			s.Resync.RateBps = float64(s.Resync.BytesSent) / el
		}
		// Copying to an empty peer, the bytes planned are those read so
		// far: no ETA.
		if s.Resync.RateBps > 0 && s.Resync.BytesPlanned > s.Resync.BytesSent && s.Resync.Phase != PhaseCopying {
			s.Resync.EtaSec = float64(s.Resync.BytesPlanned-s.Resync.BytesSent) / s.Resync.RateBps
		}
	}
	return s
}

// lag is the age of the oldest change not yet acknowledged by the peer.
// Called with p.mu held.
func (p *Primary) lag() time.Duration {
	oldest := p.pendingSince
	if q := p.out.oldest(); !q.IsZero() && (oldest.IsZero() || q.Before(oldest)) {
		oldest = q
	}
	if q := p.rsSince; p.rs.Active && !q.IsZero() && (oldest.IsZero() || q.Before(oldest)) {
		oldest = q
	}
	if oldest.IsZero() {
		return 0
	}
	return time.Since(oldest)
}

// Release says when a durability call goes on without the peer's ack
// ("alone": the change stays tracked for a resync). Releasing is safe
// only while the peer cannot take over with a copy that lacks the change:
// it is dead or cut off and told so, or it knows its copy is stale.
type Release struct {
	// Now reports whether the peer cannot take over now (the cluster
	// declared it lost, or it says its copy is stale). Checked while the
	// peer is not streaming; called with the primary's lock held, it must
	// not call back into the Primary. Nil: never.
	Now func() bool
	// After releases once the peer has not been streaming for that long
	// (0: never by time alone). For a node leaving its role.
	After time.Duration
	// Streaming, if set, reports whether Now is to be checked while the
	// peer streams too: it streamed and confirmed nothing for long (its
	// disk hung), and a connection ended for that may come back at once,
	// as silent. Called with the primary's lock held, like Now.
	Streaming func() bool
}

// WaitLag returns once the lag is at most bound: what an async directory's
// durability call waits for. Released without the peer (see Release), it
// returns ErrAlone.
func (p *Primary) WaitLag(ctx context.Context, bound time.Duration, rel Release) error {
	return p.waitPeer(ctx, rel, func() bool { return p.lag() <= bound })
}

// WaitSettled waits, after WaitShipped, for the pass that removes what
// the last passes kept aside on the peer (removeAsides, which runs at
// once) and for the peer to make it durable: a handover then leaves the
// new primary no `.duet-replaced-*` entry of this term's.
func (p *Primary) WaitSettled(ctx context.Context, rel Release) error {
	var need uint64
	have := false
	return p.waitPeer(ctx, rel, func() bool {
		if !have {
			if p.building || len(p.asides) > 0 {
				return false
			}
			need, have = p.out.last(), true
		}
		if p.out.durable >= need {
			return true
		}
		if p.out.askSync(need) {
			p.sendq.Broadcast()
		}
		return false
	})
}

// waitPeer waits until done (called with p.mu held, while connected)
// says yes. Released without the peer, it returns ErrAlone; when ctx
// ends first, ctx's error.
func (p *Primary) waitPeer(ctx context.Context, rel Release, done func() bool) error {
	// ctx's end wakes the wait; a wait that ends first wakes nobody (a
	// goroutine waiting on a cancelled context woke the builder, the
	// sender and every other waiter at the end of each call).
	stop := context.AfterFunc(ctx, p.wake)
	defer stop()
	var since time.Time // the peer has not been streaming since
	var t *time.Timer
	if rel.After > 0 {
		t = time.AfterFunc(rel.After, p.wake)
		defer t.Stop()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if p.connected && done() {
			return nil
		}
		if p.closed {
			return ErrClosed
		}
		if p.streamingLocked() {
			// Streaming: the ack comes. (Released here, a call would
			// keep the peer out of sync, hence stale, hence releasing:
			// the peer never became SECOND again under a steady writer.)
			// Unless it has not come for long (Release.Streaming).
			since = time.Time{}
			if rel.Streaming != nil && rel.Streaming() && rel.Now != nil && rel.Now() {
				return ErrAlone
			}
		} else {
			if rel.Now != nil && rel.Now() {
				return ErrAlone
			}
			if rel.After > 0 {
				if since.IsZero() {
					since = time.Now()
					t.Reset(rel.After)
				}
				if time.Since(since) >= rel.After {
					return ErrAlone
				}
			}
		}
		p.done.Wait()
	}
}

// Streaming reports whether the peer's copy is in sync: connected, the
// latest full sync applied, changes flowing as they happen.
func (p *Primary) Streaming() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.streamingLocked()
}

func (p *Primary) streamingLocked() bool {
	return p.connected && !p.needFull && p.out.acked >= p.fullSyncEnd && !p.rs.Active
}

// Close releases the root.
func (p *Primary) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.wake()
	return p.root.Close()
}

// errNoPeer is returned by FetchManifest when the peer cannot be reached.
var errNoPeer = errors.New("peer unreachable")

// FetchManifest asks the peer for its manifest of directory name. The
// peer streams it while it scans, a frame every few thousand entries; with
// progress non-nil, each frame received calls it with the entries so far
// and the sum of their sizes, comparable with a local scan's.
func FetchManifest(ctx context.Context, lk *peerlink.Link, peer string, name string, progress func(entries int, bytes uint64)) ([]wire.Entry, error) {
	c, _, err := dialPeer(ctx, lk, &net.Dialer{Timeout: 3 * time.Second}, peer, wire.Hello{Purpose: wire.PurposeManifest, Dir: name})
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return nil, fmt.Errorf("%w: %v", errNoPeer, err)
	}
	if err != nil {
		return nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Time{})
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	if err := wire.WriteFrame(c, &wire.Frame{Type: wire.TypeManifestQ, Seq: 1}); err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(c, 1<<20)
	var out []wire.Entry
	var bytes uint64
	for {
		f, err := wire.ReadFrame(br, nil)
		if err != nil {
			return nil, err
		}
		switch f.Type {
		case wire.TypeEnd:
			return out, nil
		case wire.TypeError:
			return nil, fmt.Errorf("peer: %s", f.Payload)
		case wire.TypeManifest:
			raw, err := wire.Payload(&f, nil)
			if err != nil {
				return nil, err
			}
			es, err := wire.DecodeEntries(raw)
			if err != nil {
				return nil, err
			}
			// Without the local tree's count here: four times the
			// floor (a resync's bound for a tree of 16 Mi entries).
			if limit := peerEntriesLimit(peerEntriesFloor); len(out)+len(es) > limit {
				return nil, fmt.Errorf("the peer's manifest lists more than %d entries: refused, as from a peer that would send without end", limit)
			}
			out = append(out, es...)
			if progress != nil {
				for i := range es {
					bytes += es[i].Size
				}
				progress(len(out), bytes)
			}
		default:
			return nil, fmt.Errorf("unexpected %s from peer", f.Type)
		}
	}
}

// ErrAlone is returned by WaitShipped and WaitLag when the call was
// released without the peer (see Release): changes wait for a resync.
var ErrAlone = errors.New("no peer connected: running alone")

// ErrClosed is returned by WaitShipped and WaitLag when the primary's term
// ended (Close: the node left the role) before the peer confirmed the
// call's changes.
var ErrClosed = errors.New("this node left the primary role before the change reached the peer")

// WaitShipped returns once every change captured before the call has been
// applied and synced by the peer. Released without the peer (see
// Release), it returns ErrAlone; when ctx ends first, ctx's error.
//
// It waits for the first build pass that took every change counted when
// the call began, then for that pass's last batch to be acknowledged;
// changes made after the call, by other writers, do not hold it. A pass
// that found reported bytes beyond EOF, and read the file before the call
// began, does not count: the caller's write may have moved the size
// since.
func (p *Primary) WaitShipped(ctx context.Context, kernel Kernel, rel Release) error {
	// Before the kick: a pass the kick starts takes its records after
	// start, so it covers this call even when it finds bytes beyond EOF
	// (cover.before).
	start := time.Now()
	p.barriers.Add(1)
	select {
	case p.barrierKick <- struct{}{}:
	default:
	}
	defer func() {
		p.lastBarrier.Store(time.Now().UnixNano())
		p.barriers.Add(-1)
		p.mu.Lock()
		p.barrierCount++
		p.barrierNs += int64(time.Since(start))
		p.mu.Unlock()
	}()
	if kernel != nil {
		if err := kernel.Drain(); err != nil {
			// The change may be in no record the primaries will see
			// (the term's capture stopped reading: ErrClosed; or its
			// reader is far behind).
			return fmt.Errorf("the call's changes may be in no capture record read: %w", err)
		}
	}
	drained := time.Now()
	p.Stages.Observe(latency.Drain, drained.Sub(start))
	p.mu.Lock()
	target := p.added
	p.mu.Unlock()
	var need uint64 // the batch to be made durable, once a pass covered target
	var fullSyncs, lostSessions int
	covered := false
	var coveredAt time.Time
	return p.waitPeer(ctx, rel, func() bool {
		if covered && (p.fullSyncs != fullSyncs || p.lostSessions != lostSessions) {
			// A full sync replaced the batches since (the peer lost
			// them), or the session they were in was lost (the next
			// one's batch numbers go past need without them): wait
			// for the full sync's batches.
			covered = false
		}
		if seq, ok := p.cover.covers(target, start); ok && !p.needFull && !covered {
			need, covered, fullSyncs, lostSessions = seq, true, p.fullSyncs, p.lostSessions
			if coveredAt.IsZero() {
				coveredAt = time.Now()
				p.Stages.Observe(latency.Build, coveredAt.Sub(drained))
			}
		}
		if covered && p.out.durable >= need {
			p.Stages.Since(latency.Peer, coveredAt)
			return true
		}
		if covered && p.out.askSync(need) {
			p.sendq.Broadcast()
		}
		return false
	})
}
