package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/replica"
)

// The primary role's machinery: the capture, the per-directory
// primaries it feeds, the kernel handle they drain through, and what a
// ring overflow costs.

func (n *Node) startPrimary(ctx context.Context) error {
	var primaries []*replica.Primary
	for i, d := range n.dirs {
		p, err := replica.NewPrimary(d, n.cfg.Peer, n.link, capture.KernelDev(n.devs[i]), n.log)
		if err != nil {
			for _, p := range primaries {
				p.Close()
			}
			return err
		}
		p.OnAck = func(lag time.Duration) { n.metrics.lags.Observe(lag.Seconds()) }
		pr := &prober{dir: d.Path, dev: n.devs[i]}
		p.DiskCheck = func(ctx context.Context) error {
			err := pr.probe(ctx, diskProbeHang)
			switch {
			case !diskBroken(err):
				return nil // other errors are the watcher's to log
			case errors.Is(err, errProbeHung):
				return err // put off, not marked: the watcher judges a hang
			}
			n.log.Error("the disk under a replicated directory fails: no connection or resync from it", "dir", d.Name, "err", err)
			n.diskFailed(i, err)
			p.DiskFailed() // not among n.primaries yet at the term's start
			return err
		}
		if why := n.failedDisk(d.Name); why != "" {
			// Failed earlier in this run. A disk that works again (a
			// stall, a remount) serves again; its copy stays Crashed
			// until a resync compares it. Briefly: this runs in the
			// cluster loop.
			if err := pr.probe(context.Background(), termStartWait); err != nil {
				p.DiskFailed()
			} else {
				n.log.Warn("the disk under a replicated directory passes its check again: replicating from it", "dir", d.Name, "failed_with", why)
				n.failedDisks.Delete(d.Name)
			}
		}
		// The heartbeats say "synced" from now on: said at once, the
		// peer turns SECOND an interval sooner.
		p.OnResyncDone = n.kickHeartbeat
		p.Stages = &n.stages
		p.Epoch = n.clusterEpoch
		primaries = append(primaries, p)
		err = p.BeginTerm(replica.Term{Meta: n.metas[i], DirtyPath: n.bitmapPath(d.Name),
			Margin: n.cfg.Resync.Margin, Rate: int64(n.cfg.Resync.RateMiB) << 20})
		if err != nil {
			for _, p := range primaries {
				p.Close()
			}
			return err
		}
	}
	c, err := n.takeCapture()
	if err == nil {
		if err = c.Attach(); err != nil {
			c.Close()
		}
	}
	if err != nil {
		for _, p := range primaries {
			p.Close()
		}
		return fmt.Errorf("starting capture: %w", err)
	}
	var active []string
	for _, h := range c.Hooks() {
		if h.Active {
			active = append(active, h.Type+"/"+h.Name)
		} else {
			n.log.Warn("capture hook unavailable", "hook", h.Name, "err", h.Error)
		}
	}
	n.log.Info("capture attached", "hooks", strings.Join(active, ","))
	// Before any record is dispatched: as of the attach (mapped.go).
	if k := mappedFiles(n.devs, func(r *capture.Record) {
		for _, p := range primaries {
			if p.Dev == r.Dev {
				p.Record(r, time.Now())
			}
		}
	}); k > 0 {
		n.log.Info("files mapped shared and writable before the capture attached: each written back and read whole", "files", k)
	}
	// Cleared before the primaries are published: a durability call may
	// be released alone as soon as they are, and the mark of that must
	// stay (the heartbeats' "synced" waits for its catch-up).
	n.releasedAlone.Store(false)
	n.smu.Lock()
	n.cap, n.primaries = c, primaries
	n.overflowTo.Store(&primaries)
	n.eager.Store(false) // a new capture starts with lazy wake-ups
	n.serveCancel = func() {}
	n.dispatched.Store(0)
	n.dispatchedEnd.Store(0) // a new ring
	n.overflowSeen = 0
	n.smu.Unlock()
	n.silent.Clear()
	n.serveWG.Add(4)
	go func() {
		defer n.serveWG.Done()
		n.dispatch(c, primaries)
	}()
	go func() {
		defer n.serveWG.Done()
		n.watchOverflow(ctx, c)
	}()
	go func() {
		defer n.serveWG.Done()
		n.watchDisks(ctx)
	}()
	go func() {
		defer n.serveWG.Done()
		n.auditMarks(ctx, c, kernel{n}.drain, primaries)
	}()
	return nil
}

// startStreams runs the term's primaries (startPrimary): each connects to
// the peer and begins with a resync. Not before serve holds the VIP as
// well as the capture: a resync marks the peer's copy mid-resync as soon
// as it asks for its manifest, and a term that then fails (the VIP held
// elsewhere) would leave a handover's giver unable to take the role back
// (a review, TestStreamsBeginOnlyOnceTheRoleIsTaken). ctx is
// startPrimary's.
func (n *Node) startStreams(ctx context.Context) {
	n.smu.RLock()
	primaries := n.primaries
	n.smu.RUnlock()
	n.serveWG.Add(len(primaries))
	for _, p := range primaries {
		go func() {
			defer n.serveWG.Done()
			p.Run(ctx, kernel{n})
		}()
	}
}

func (n *Node) stopPrimary() {
	n.smu.Lock()
	cancel, c := n.serveCancel, n.cap
	n.serveCancel = nil
	n.smu.Unlock()
	if cancel == nil {
		return
	}
	cancel()
	n.stopReading(c)
	n.serveWG.Wait()
	n.detaching.Go(func() {
		if err := c.Close(); err != nil {
			n.log.Warn("detaching capture", "err", err)
		}
	})
	n.smu.Lock()
	primaries := n.primaries
	n.cap, n.primaries = nil, nil
	n.overflowTo.Store(nil)
	n.smu.Unlock()
	// Saved outside smu: SaveDirty fsyncs, and the heartbeat sender takes
	// smu (a slow disk would silence the heartbeats, and the peer would
	// take over by timeout rather than by the handover).
	for _, p := range primaries {
		if err := p.SaveDirty(); err != nil {
			n.log.Error("saving the modification bitmap: the next term compares the files changed since the sync point", "dir", p.Dir.Name, "err", err)
		}
		p.Close()
	}
	n.preloadCapture()
}

// stopReading ends the term's capture reading; its hooks are detached
// later (Close: about 0.5 s of the kernel's grace periods here, which the
// handover, and so the peer's service, waited for). A barrier's Drain
// waiting for records the reader will not dispatch any more ends now: it
// waited out drainTimeout, and a stop with a writer running took 10 s.
func (n *Node) stopReading(c *capture.Capture) {
	c.StopReading()
	n.wakeDrains()
}

// preloaded is a capture loaded ahead of a takeover, not attached.
type preloaded struct {
	done chan struct{}
	c    *capture.Capture
	err  error
}

func (n *Node) captureOptions() capture.Options {
	return capture.Options{Devices: n.devs, RingBytes: uint32(n.cfg.RingBufferKiB) << 10, XFS: n.xfs, Btrfs: n.btrfs}
}

// bitmapPath is where a directory's primary saves the changes the peer
// lacks (replica.Term.DirtyPath).
func (n *Node) bitmapPath(dir string) string { return filepath.Join(n.cfg.StateDir, "bitmap-"+dir) }

// preloadCapture loads the next term's capture in the background, with
// fresh maps: verifying the programs is most of the time a takeover
// would otherwise spend on capture.
func (n *Node) preloadCapture() {
	p := &preloaded{done: make(chan struct{})}
	n.smu.Lock()
	n.next = p
	n.smu.Unlock()
	go func() {
		p.c, p.err = capture.Load(n.captureOptions())
		close(p.done)
	}()
}

// takeCapture returns the preloaded capture (waiting for it if needed).
func (n *Node) takeCapture() (*capture.Capture, error) {
	n.smu.Lock()
	p := n.next
	n.next = nil
	n.smu.Unlock()
	if p == nil {
		return capture.Load(n.captureOptions())
	}
	<-p.done
	return p.c, p.err
}

// peerSynced: every directory streams to the peer, and whatever a barrier
// released without the peer has been shipped since.
func (n *Node) peerSynced() bool {
	return n.streaming() && n.caughtUp()
}

// streaming reports whether every replicated directory streams to the
// peer.
func (n *Node) streaming() bool { return streams(n.servingPrimaries()) }

// servingPrimaries returns the primaries of the serving term (none when
// not serving). smu is not held after: a holder waiting for a Primary's
// lock (Drain takes smu again; a waiting call takes relMu) would deadlock
// with a writer queued for smu.
func (n *Node) servingPrimaries() []*replica.Primary {
	n.smu.RLock()
	defer n.smu.RUnlock()
	return n.primaries
}

// streams reports whether there are primaries and each streams to the
// peer.
func streams(primaries []*replica.Primary) bool {
	if len(primaries) == 0 {
		return false
	}
	for _, p := range primaries {
		if !p.Streaming() {
			return false
		}
	}
	return true
}

// caughtUp reports whether nothing released without the peer is still
// to be shipped; if something is, it starts the catch-up.
func (n *Node) caughtUp() bool {
	if !n.releasedAlone.Load() {
		return true
	}
	n.catchUp(n.servingPrimaries())
	return false
}

// catchUp starts, unless one runs, a wait until every change captured so
// far (those released without the peer included) is durable on the peer;
// then the peer counts as in sync again, unless something was released
// alone meanwhile. It used to require every directory to be idle at one
// instant (nothing queued or pending): under a steady write load, as an
// NFS client's, that instant may never come, and the returning peer stayed
// WAIT for good.
func (n *Node) catchUp(primaries []*replica.Primary) {
	if !n.catchingUp.CompareAndSwap(false, true) {
		return
	}
	gen := n.aloneGen.Load()
	go func() {
		defer n.catchingUp.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), n.barrierTimeout)
		defer cancel()
		// Released, as a durability call is, once the peer cannot take
		// over: it is not in sync then anyway.
		rel := replica.Release{Now: n.tryRelease}
		for _, p := range primaries {
			if err := p.WaitShipped(ctx, kernel{n}, rel); err != nil {
				return
			}
		}
		// Under relMu: a release (tryRelease) between the check and the
		// clear would be forgotten, and the heartbeats say "synced"
		// with it unshipped.
		n.relMu.Lock()
		caught := n.aloneGen.Load() == gen
		if caught {
			n.releasedAlone.Store(false)
		}
		n.relMu.Unlock()
		if caught {
			select { // say so now, not at the next tick
			case n.hbKick <- struct{}{}:
			default:
			}
		}
	}()
}

// recordReader is the capture's reading side.
type recordReader interface {
	Read(*capture.Record) error
}

// dispatch hands every capture record to the primaries of its device.
func (n *Node) dispatch(c recordReader, primaries []*replica.Primary) {
	var r capture.Record
	// One line per record at debug level: the raw material for finding
	// a missed change. Checked once; the hot path stays a branch.
	debug := n.log.Enabled(context.Background(), slog.LevelDebug)
	for {
		if err := c.Read(&r); err != nil {
			if !errors.Is(err, os.ErrClosed) {
				n.captureFailed(err)
			}
			return
		}
		if debug {
			n.log.Debug("capture record", "seq", r.Seq, "ino", r.Ino, "gen", r.Gen, "kind", r.Kind, "hook", r.Hook, "pos", r.Pos, "len", r.Len)
		}
		now := time.Now()
		for _, p := range primaries {
			if p.Dev == r.Dev {
				p.Record(&r, now)
			}
		}
		n.dispatched.Add(1)
		n.dispatchedEnd.Store(r.End)
		if n.drainWaiters.Load() > 0 {
			n.wakeDrains()
		}
	}
}

// captureFailed ends a term whose capture reader failed on something
// other than its close (a corrupt record header, an epoll error). The
// records left in the ring are never read: no durability call can be
// confirmed again, and what is written from now on would reach the peer
// only through a resync. The node had gone on serving, every durability
// call failing after drainTimeout. It now fails as a crashed daemon does
// (failAsCrashed; TestCaptureReaderFailureFailsTheTerm).
func (n *Node) captureFailed(err error) {
	n.failAsCrashed("the capture reader failed: this node fails as a crashed daemon does (services killed, VIP removed, the daemon exits); "+
		"restarted, it compares its changes since its sync point with the peer's", "err", err)
}

// failKillWait bounds how long failAsCrashed waits for the services.
const failKillWait = 10 * time.Second

// failAsCrashed makes the node fail as a crashed daemon does, the fault
// every campaign makes: the services are killed (a held durability call
// of theirs never returns; `duet exec`'s calls fail with EIO once the
// daemon is gone), the VIP is removed, so that the peer, which holds every
// confirmed write, takes over after its checks, and the daemon exits with
// status 1 without saving its bitmap or its clean-stop marker. Restarted
// (the unit's Restart=on-failure), it compares the files changed here
// since its sync point with the peer's (the resync's `recent` mode).
func (n *Node) failAsCrashed(msg string, args ...any) {
	n.failWith(1, msg, args...)
}

// exitNotRestarted is the exit status of a daemon whose state_dir's
// filesystem is gone from under it (unmounted): the unit does not restart
// it (RestartPreventExitStatus in tools/systemd/duet.service). Restarted,
// it would make an empty state_dir on the bare mountpoint and start as a
// node that never served (from a review).
const exitNotRestarted = 3

// failWith is failAsCrashed with exit status code.
func (n *Node) failWith(code int, msg string, args ...any) {
	n.log.Error(msg, args...)
	if n.stack != nil {
		// Bounded: a service stuck in a hung disk's I/O outlives its
		// SIGKILL, and the VIP must go anyway (from a review). The
		// rest dies with the daemon (barrier.StartGroup).
		killed := make(chan struct{})
		go func() {
			n.stack.Kill()
			close(killed)
		}()
		select {
		case <-killed:
		case <-time.After(failKillWait):
			n.log.Error("services still not gone: removing the VIP and exiting anyway", "after", failKillWait)
		}
	}
	n.vipMu.Lock()
	n.failing = true // no term adds the VIP from now on
	n.vipMu.Unlock()
	if n.vip != nil {
		// A VIP left here (or added by the takeVIP of a term that failed
		// at once) keeps the peer from taking over until the restarted
		// daemon removes it.
		if err := n.removeVIP(); err != nil {
			n.log.Error("removing the VIP: the peer will not take over until duet restarts here and removes it", "vip", n.vip.String(), "err", err)
		}
	}
	exit := n.exit
	if exit == nil {
		exit = os.Exit
	}
	exit(code)
}

// kernel gives primaries the capture side: in-flight marks and the drain
// barrier.
type kernel struct{ n *Node }

func (k kernel) capture() *capture.Capture {
	k.n.smu.RLock()
	defer k.n.smu.RUnlock()
	return k.n.cap
}

func (k kernel) ForgetChunks(keys []capture.CaptureChunkKey) error {
	if c := k.capture(); c != nil {
		return c.ForgetChunks(keys)
	}
	return nil
}

func (k kernel) ForgetAttr(key capture.InodeKey) {
	if c := k.capture(); c != nil {
		c.ForgetAttr(key)
	}
}

func (k kernel) Seq() uint64 {
	c := k.capture()
	if c == nil {
		return 0
	}
	ctr, err := c.Counters()
	if err != nil {
		return 0
	}
	return ctr.Seq
}

// Drain waits until every record reserved before the call was dispatched
// and every record lost before it was turned into a rescan: the ring's
// producer position is past every record reserved so far, and the reader
// takes them in that order, never past one reserved and not submitted
// yet. (The kernel's sequence is not that order: a record is numbered
// after its reservation, and waiting for S records to be read left one
// numbered up to S unread when another CPU's record, reserved before it,
// was numbered after: capture.Reserved.) A lost record leaves a mark instead, which the barrier
// must see before it picks its target (the 50 ms watcher alone would let
// the durability call return before the lost write was shipped). Bounded
// by drainTimeout, in case the reader is stuck: past it the barrier's
// target misses the records not read yet, which is said in the log. Once
// the term's capture stopped reading (stopPrimary), the records not read
// never will be: an error, and the durability call fails (it returned
// "ok", its change shipped nowhere, while the node handed over).
func (k kernel) Drain() error {
	err := k.drain()
	var behind errDrainBehind
	if errors.As(err, &behind) {
		k.n.log.Error("capture reader behind by more than the drain timeout: a durability call fails",
			"behind_bytes", uint64(behind), "timeout", drainTimeout)
	}
	return err
}

// errDrainBehind: the reader was this many bytes of records short of the
// target when drainTimeout passed.
type errDrainBehind uint64

func (e errDrainBehind) Error() string {
	return fmt.Sprintf("the capture reader is %d bytes of records behind after %v", uint64(e), drainTimeout)
}

// drain is Drain without its log line: the mark audit drains too, and a
// reader behind there fails no durability call, only delays the audit.
func (k kernel) drain() error {
	c := k.capture()
	if c == nil {
		// No capture (tests), or the term's primaries have ended: their
		// calls end on the primary (closed, or not connected).
		return nil
	}
	if c.Stopped() {
		// The reader stopped (the role is being handed over), and the
		// hooks are detached soon after: a write made now may leave no
		// record at all, and the counters would then show nothing to
		// wait for.
		return errNoCapture
	}
	n := k.n
	ctr, err := c.Counters()
	if err != nil {
		return err
	}
	// The position after the counters: a record counted lost before the
	// read above was not reserved, and one reserved before it is before
	// the position.
	target, err := c.Reserved()
	if err != nil {
		return err
	}
	n.takeOverflow(c, ctr.Lost)
	if n.dispatchedEnd.Load() >= target {
		return nil
	}
	// Registered before the check under the lock: a record dispatched
	// after it wakes this waiter (a sleep-and-poll loop costs a timer
	// tick, a millisecond, on every barrier).
	n.drainWaiters.Add(1)
	defer n.drainWaiters.Add(-1)
	c.Kick()
	timedOut := false
	t := time.AfterFunc(drainTimeout, func() {
		n.drainMu.Lock()
		timedOut = true
		n.drained.Broadcast()
		n.drainMu.Unlock()
	})
	defer t.Stop()
	stopped := false
	n.drainMu.Lock()
	for n.dispatchedEnd.Load() < target && !timedOut {
		if stopped = c.Stopped(); stopped {
			break
		}
		n.drained.Wait()
	}
	n.drainMu.Unlock()
	if stopped {
		return errNoCapture
	}
	if timedOut {
		// The call's record is not read yet: it is in no pass, and
		// answered "ok" the call would lose its write on a failover
		// (TestDrainShortOfTargetIsNotSuccess). It fails (EIO).
		return errDrainBehind(target - n.dispatchedEnd.Load())
	}
	return nil
}

// errNoCapture: the term's capture no longer reads records.
var errNoCapture = fmt.Errorf("the capture stopped reading (%w)", replica.ErrClosed)

// drainTimeout bounds Drain. It was 1 s: a reader that much behind (a
// loaded host, a burst of records) let a barrier's target miss writes
// made before the call. Within defaultBarrierTimeout, so the call still ends.
const drainTimeout = 10 * time.Second

func (n *Node) wakeDrains() {
	n.drainMu.Lock()
	n.drained.Broadcast()
	n.drainMu.Unlock()
}

// watchOverflow turns lost records into rescans when no barrier does:
// of the inodes the kernel marked, or of whole trees when even the marks
// overflowed.
func (n *Node) watchOverflow(ctx context.Context, c *capture.Capture) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	dioFullSaid := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n.eager.Load() && bootSince(n.lastBarrier.Load()) > eagerHold {
			if c.SetEagerWake(false) == nil {
				n.eager.Store(false)
			}
		}
		ctr, err := c.Counters()
		if err != nil {
			continue
		}
		n.takeOverflow(c, ctr.Lost)
		if ctr.DioFull > 0 && !dioFullSaid {
			dioFullSaid = true
			n.log.Warn("capture: more O_DIRECT writes in flight than tracked (65536): until this node next takes the role, "+
				"every O_DIRECT completion on a file open for writing is shipped, reads too", "writes", ctr.DioFull)
		}
	}
}

// takeOverflow queues the rescans of records lost up to lost (the
// kernel's count, read after the marks it covers were made: the BPF code
// marks before it counts). A mark taken after the count was read is
// handled now or at the next call.
func (n *Node) takeOverflow(c *capture.Capture, lost uint64) {
	n.overflowMu.Lock()
	defer n.overflowMu.Unlock()
	if lost == n.overflowSeen {
		return
	}
	var primaries []*replica.Primary
	if ps := n.overflowTo.Load(); ps != nil {
		primaries = *ps
	}
	ctr, err := c.Counters()
	if err != nil {
		return
	}
	if ctr.Rescan > 0 {
		n.log.Warn("capture overflow: rescanning every replicated tree", "lost_records", ctr.Lost)
		if err := c.ResetRescan(); err != nil {
			n.log.Error("capture overflow: resetting the rescan counter", "err", err)
		}
		for _, p := range primaries {
			p.RescanAll()
		}
	}
	keys, err := c.TakeOverflow()
	if err != nil {
		n.log.Error("capture overflow: reading the marks", "err", err)
		return
	}
	if len(keys) > 0 && time.Since(n.overflowLogged) > time.Second {
		// Under a sustained overflow every barrier gets here: once a
		// second is enough to say it goes on.
		n.overflowLogged = time.Now()
		n.log.Warn("capture overflow: rescanning files", "files", len(keys), "lost_records", ctr.Lost)
	}
	for _, k := range keys {
		for _, p := range primaries {
			if p.Dev == k.Dev {
				p.Rescan(k)
			}
		}
	}
	n.overflowSeen = lost
}
