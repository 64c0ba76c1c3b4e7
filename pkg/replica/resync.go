package replica

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path"
	"runtime/debug"
	"slices"
	"strings"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// Resync tuning.
const (
	// DefaultMargin is subtracted from a sync point before files are
	// picked by their ctime/mtime: clocks of two nodes differ, and a
	// change is stamped a little before it is captured.
	DefaultMargin = 30 * time.Second
	// syncEvery is how often a primary asks the peer to make what it
	// acknowledged durable, and moves its own sync point on.
	syncEvery = 5 * time.Second
	// maxMarks bounds the passes remembered until the peer syncs.
	maxMarks = 256
	// clearEvery spaces the bitmap's clean-ups.
	clearEvery = 250 * time.Millisecond
	// maxReport bounds the lines of a discarded-changes report.
	maxReport = 100000
)

// ResyncStatus is the progress of a directory's resync (or the last one).
type ResyncStatus struct {
	Active bool `json:"active"`
	// Mode: bitmap (the chunks the bitmap marks), recent (files changed
	// since the sync point, by checksums), bitmap+recent, or full.
	Mode string `json:"mode,omitempty"`
	// Phase: scanning, comparing, sending, PhaseWaiting; or
	// PhaseCopying instead of the first three.
	Phase         string    `json:"phase,omitempty"`
	Started       time.Time `json:"started,omitempty"`
	Ended         time.Time `json:"ended,omitempty"`
	FilesTotal    int       `json:"files_total"`
	FilesCompared int       `json:"files_compared"`
	FilesSent     int       `json:"files_sent"`
	BytesPlanned  uint64    `json:"bytes_planned"`
	BytesSent     uint64    `json:"bytes_sent"`
	RateBps       float64   `json:"rate_bytes_per_sec"`
	EtaSec        float64   `json:"eta_sec"`
	Discarded     int       `json:"discarded_entries"`
}

// PhaseCopying is the phase of a resync to a peer whose copy is empty:
// the tree is sent as it is read, and FilesTotal and BytesPlanned count
// what the walk has read so far.
const PhaseCopying = "copying"

// PhaseWaiting is the phase of a resync that queued its end and waits for
// the peer to confirm it (finishResync ends only such a resync).
const PhaseWaiting = "waiting for the peer"

// Term configures a primary's term: where its copy's state lives and how
// its resyncs run. Set before Run.
type Term struct {
	Meta      *MetaStore
	DirtyPath string        // where the bitmap is saved at a clean stop
	Margin    time.Duration // default DefaultMargin
	Rate      int64         // resync bytes per second, 0: unlimited
}

// BeginTerm makes this node the source of the directory: it draws a new
// generation and works out what its bitmap can be trusted for. A bitmap
// saved at a clean stop is loaded; a node that was a consistent replica
// starts with an empty one relative to the generation it followed; after a
// crash the bitmap is lost and resyncs compare the files changed since the
// sync point.
func (p *Primary) BeginTerm(t Term) error {
	if t.Margin <= 0 {
		t.Margin = DefaultMargin
	}
	p.term = t
	m := t.Meta.Get()
	trusted := false
	var untracked int64 // changes since were not captured (0: none)
	base := m.Base
	if !m.Source {
		base = m.Gen
	}
	if !m.Consistent && !m.Source {
		base = 0 // a resync into this copy was cut short: compare all
	}
	why := "trusted"
	switch {
	case base == 0:
		why = "none: the peer's copy is of unknown lineage, the first resync compares every file"
	case m.Crashed:
		why = "lost: duet did not stop cleanly, files changed since the sync point are compared"
	case m.Source:
		d, b, err := loadDirty(t.DirtyPath)
		switch {
		case err == nil && b == m.Base && !d.lost:
			p.dirty, trusted = d, true
			// Nothing captured the changes made while duet was
			// stopped: the files changed since the bitmap was saved
			// are compared too (by ctime, which a writer cannot set
			// back as it can the mtime).
			if fi, serr := os.Stat(t.DirtyPath); serr == nil {
				untracked = fi.ModTime().UnixNano()
			} else {
				trusted = false
				why = "saved time unknown (" + serr.Error() + "): files changed since the sync point are compared"
			}
		case err == nil:
			why = "stale or incomplete (capture records were lost): files changed since the sync point are compared"
		case errors.Is(err, os.ErrNotExist):
			why = "missing: files changed since the sync point are compared"
		default:
			why = "not usable (" + err.Error() + "): files changed since the sync point are compared"
		}
	default:
		trusted = true
	}
	os.Remove(t.DirtyPath) // from now on it lives in memory; saved again at a clean stop
	gen := NewGen()
	if m.Untracked != 0 && (untracked == 0 || m.Untracked < untracked) {
		untracked = m.Untracked // an earlier stop's window, not compared yet
	}
	if err := t.Meta.Update(func(m *Meta) {
		m.Gen, m.Base, m.Source, m.Consistent = gen, base, true, true
		m.Untracked = untracked
	}); err != nil {
		return err
	}
	p.mu.Lock()
	p.lin = lineage{gen: gen, base: base, trusted: trusted, selfSync: m.SyncTime, untracked: untracked}
	p.meta = t.Meta
	p.mu.Unlock()
	p.Log.Info("source of the directory", "gen", fmt.Sprintf("%016x", gen), "peer_copy", fmt.Sprintf("%016x", base),
		"bitmap", why,
		"bitmap_bytes", p.dirty.bytes())
	return nil
}

// resyncPlan is how a resync compares the trees.
type resyncPlan struct {
	mode     string
	all      bool  // every file by checksums
	useDirty bool  // files not compared get the bitmap's chunks
	cutoffS  int64 // this side's files changed since are compared (0: none)
	cutoffT  int64 // the peer's files changed since are compared (0: none)
	report   bool  // the peer's copy may hold changes of its own
}

// plan decides the resync for a peer that welcomed us with w. Called with
// p.mu held.
func (p *Primary) plan(w wire.Welcome) resyncPlan {
	return p.lin.plan(w, p.forceAll, p.term.Margin)
}

// fullSync brings the peer's copy level with this one, moving as little
// as the two copies' states allow (see plan); the shadow is rebuilt from
// the scan. Capture goes on meanwhile: what changes during the resync is
// in the journal and follows it.
func (p *Primary) fullSync(ctx context.Context, c net.Conn, kernel Kernel, bt *batcher, manifest <-chan wire.Frame) error {
	if err := p.diskGone(ctx); err != nil {
		return err
	}
	start := time.Now()
	// The peer's manifest must reflect every batch already queued.
	p.mu.Lock()
	for ctx.Err() == nil && !p.out.empty() {
		p.work.Wait()
	}
	if ctx.Err() != nil {
		// Ended while it waited (or probed the disk): nothing taken.
		p.mu.Unlock()
		return ctx.Err()
	}
	seq := p.out.next
	// The scan below sees every change counted so far.
	mark := p.added
	pl := p.plan(p.welcome)
	var dirty *dirtySet    // the bitmap, read after the scan (below)
	var lastShadow *shadow // the names the peer was last given (markBitmapCompared)
	var bitmapBytes uint64
	if pl.useDirty {
		p.clearDirty(true)
		lastShadow = p.sh
		bitmapBytes = p.dirty.bytes()
	}
	// What the journal holds now, the resync reads anyway (the bitmap
	// marks it, or its files changed since the sync point, or every file
	// is compared): shipped twice otherwise.
	dropped := p.dropForResync()
	// The resync's batches carry the age of the oldest change they hold,
	// and the lag counts it until the resync ends (rsSince): in no batch
	// while the resync scans and compares (minutes on a big tree), it was
	// counted by nothing, and the lag read 0 (TestLagCountsChangesAResyncTookOver).
	// A resync that did not end (its connection was lost) still owes its
	// changes to the peer.
	bt.since = p.pendingSince
	if p.rs.Active && !p.rsSince.IsZero() && (bt.since.IsZero() || p.rsSince.Before(bt.since)) {
		bt.since = p.rsSince
	}
	p.rsSince = bt.since
	if p.j.Pending() == 0 {
		p.pendingSince = time.Time{}
	}
	p.rs = ResyncStatus{Active: true, Mode: pl.mode, Phase: "scanning", Started: start}
	p.rsAsked = p.fullAsked
	p.rsSent.Store(0)
	p.out.resyncBegins()
	gen := p.lin.gen
	p.mu.Unlock()
	// Before anything is read, and before any return: a change after
	// this point emits a record. A mark left set with its change dropped
	// from the journal silences that inode for the rest of the term (a
	// directory: every entry made in it later is never shipped,
	// TestResyncCutAtStartLeavesMarksStuck).
	forgetMarks(kernel, dropped)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	cut := func(ns int64) string {
		if ns == 0 {
			return "-"
		}
		return time.Unix(0, ns).UTC().Format(time.RFC3339Nano)
	}
	p.Log.Info("resync: comparing with the peer", "mode", pl.mode, "bitmap_bytes", bitmapBytes,
		"recent_here_since", cut(pl.cutoffS), "recent_there_since", cut(pl.cutoffT), "journal_files_folded_in", len(dropped),
		"peer_gen", fmt.Sprintf("%016x", p.welcome.Gen), "peer_state", int(p.welcome.State))
	var syncSeq uint64
	if kernel != nil {
		syncSeq = kernel.Seq()
	}
	query := func(want []string, shifts []uint8) error {
		q := wire.ManifestQuery{All: pl.all, Cutoff: pl.cutoffT, Want: want, WantShift: shifts, Gen: gen, MovedDirs: pl.report}
		if p.resyncStep != nil {
			p.resyncStep("asked")
		}
		return wire.WriteFrame(c, &wire.Frame{Type: wire.TypeManifestQ, Seq: seq, Payload: wire.AppendManifestQuery(nil, &q)})
	}
	run := resyncRun{start: start, mode: pl.mode, mark: mark, gen: gen, syncSeq: syncSeq}
	var first []wire.Entry // the peer's manifest read so far
	ended := false         // and all of it
	if pl.all {
		// Both sides read everything: at the same time.
		if err := query(nil, nil); err != nil {
			return err
		}
		var err error
		if first, ended, err = manifestStart(ctx, manifest); err != nil {
			return err
		}
		if ended && emptyManifest(first) {
			return p.streamSync(kernel, bt, pl, run, dropped)
		}
	}
	// Without checksums: only the files the peer has are compared by
	// them (see localSums).
	local, tooLong, err := scanListing(p.root, false)
	if err != nil {
		return fmt.Errorf("scanning %s: %w", p.Dir.Path, err)
	}
	if tooLong > 0 {
		p.Log.Warn("entries left out of the resync: their paths are longer than the wire takes (the peer's scan leaves them out too)",
			"entries", tooLong, "limit", wire.MaxPath)
	}
	run.scanned = time.Now()
	if p.resyncStep != nil {
		p.resyncStep("scanned")
	}
	// The bitmap is read after the scan, with what changed while the
	// tree was read: the scan may list a directory moved meanwhile under
	// its new name, and the shadow this resync leaves is the scan's, so
	// no pass after it ships the move. Its marks tell it: blind ones
	// without a shadow, a file's own times, and in every mode the
	// directories changed during the scan (markLateMoved). A window
	// alone does not: the scan may have read the parent's times before
	// the move.
	if kernel != nil {
		if err := kernel.Drain(); err != nil {
			return err
		}
	}
	late := map[uint64]bool{}
	p.mu.Lock()
	for ino, f := range p.dirty.files {
		if f.touch() > mark { // metadata (a directory has no chunks)
			late[ino] = true
		}
	}
	if pl.useDirty {
		dirty = p.dirty.clone()
	}
	p.mu.Unlock()
	recent := 0 // files changed here since cutoffS
	if !pl.all {
		paths := markRecent(local, pl.cutoffS)
		paths = append(paths, markLateMoved(local, late)...)
		if dirty != nil {
			bp, moved := markBitmapCompared(local, dirty, lastShadow)
			paths = append(paths, bp...)
			// This resync replaces the shadow of the peer's names by
			// its scan once its batches are queued, not once the peer
			// has them: the inodes the old shadow told as moved stay
			// marked until a later pass is durable, or a resync cut
			// short would leave the next one nothing to tell them by.
			p.mu.Lock()
			p.noteMoved(moved, mark)
			p.mu.Unlock()
		}
		recent = len(paths)
		if len(paths) > wire.MaxWant {
			return p.escalate("too many files changed since the sync point to name them")
		}
		if err := query(paths, pickShifts(local, paths, fineSumBudget)); err != nil {
			return err
		}
	}
	files := local.len()
	p.setPhase("comparing", files)
	var sums *localSums
	if pl.all || recent > 0 {
		sums = newLocalSums(p.root, local)
		defer sums.abandon()
	}
	if recent > 0 {
		// Summed here while the peer walks its tree and sums its copies:
		// after a restart of both nodes soon after writes, every file
		// may be one (issue 18).
		sums.feedRecent()
	}
	peer := &listing{}
	limit := peerEntriesLimit(files)
	take := func(es []wire.Entry) error {
		if peer.len()+len(es) > limit {
			return fmt.Errorf("the peer's manifest lists more than %d entries (%d here): refused, as from a peer that would send without end (a peer of another version, or a hostile one)", limit, files)
		}
		if pl.all {
			sums.match(es)
		}
		for i := range es {
			peer.add(&es[i])
		}
		return nil
	}
	if err := take(first); err != nil {
		return err
	}
	first = nil
	for !ended {
		es, end, err := readManifestFrame(ctx, manifest)
		if err != nil {
			return err
		}
		ended = end
		if err := take(es); err != nil {
			return err
		}
	}
	run.manifested = time.Now()
	if sums != nil {
		if err := sums.wait(); err != nil {
			return err
		}
		run.summed = time.Now()
	}
	compared := 0
	if pl.all {
		for i := range files {
			if local.at(i).flags&wire.EntrySummed != 0 {
				compared++
			}
		}
	} else if compared, err = sumCompared(p.root, local, peer); err != nil {
		return err
	}
	ts := &treeSync{dirty: dirty, window: !pl.all, report: pl.report, sumMatched: pl.all}
	ts.onPlan = func(planned uint64) {
		p.mu.Lock()
		p.rs.BytesPlanned = planned
		p.mu.Unlock()
	}
	p.mu.Lock()
	p.rs.Phase, p.rs.FilesCompared = "sending", compared
	p.mu.Unlock()
	b := newBuilder(p.root, p.Dev, nil, kernel, bt, p.Log, p.readBuf)
	b.onRead, b.stop = p.resyncRead, bt.ctx.Err
	if dirty != nil {
		ts.shipped = func(ino uint64) { p.fileShipped(ino, mark) }
	}
	tails := newTailFinder(dropped, p.Dev)
	for i := range files {
		l := local.at(i)
		tails.see(l.ino, l.mode, l.size)
	}
	run.compared = time.Now()
	if err := b.fullSync(local, peer, ts); err != nil {
		return err
	}
	p.resyncQueued(b, bt, ts, tails, run, files, compared)
	return nil
}

// resyncRun is what a resync knows from its start on.
type resyncRun struct {
	start   time.Time
	mode    string
	mark    uint64 // the changes counted when it started (p.added)
	gen     uint64
	syncSeq uint64 // the capture's sequence when it started
	// When its steps ended (zero: not reached), for the log: the local
	// scan, the peer's manifest read whole, this side's checksums, and
	// the comparison (sending starts).
	scanned, manifested, summed, compared time.Time
}

// steps is how long each step of r took, for the log.
func (r *resyncRun) steps() string {
	var parts []string
	last := r.start
	for _, s := range []struct {
		name string
		at   time.Time
	}{{"scan", r.scanned}, {"peer_manifest", r.manifested}, {"sums_here", r.summed}, {"compare", r.compared}, {"send", time.Now()}} {
		if s.at.IsZero() {
			continue
		}
		parts = append(parts, fmt.Sprintf("%s=%s", s.name, s.at.Sub(last).Round(time.Millisecond)))
		last = s.at
	}
	return strings.Join(parts, " ")
}

// readManifestFrame reads one frame of the peer's manifest: its entries, or
// that it ended.
func readManifestFrame(ctx context.Context, manifest <-chan wire.Frame) (es []wire.Entry, end bool, err error) {
	select {
	case <-ctx.Done():
		return nil, false, ctx.Err()
	case f := <-manifest:
		if f.Type == wire.TypeEnd {
			return nil, true, nil
		}
		raw, err := wire.Payload(&f, nil)
		if err != nil {
			return nil, false, err
		}
		es, err := wire.DecodeEntries(raw)
		if err != nil {
			return nil, false, fmt.Errorf("peer manifest: %w", err)
		}
		return es, false, nil
	}
}

// manifestStart reads the peer's manifest until it ends or names an entry
// other than its root: enough to tell whether its copy is empty.
func manifestStart(ctx context.Context, manifest <-chan wire.Frame) (es []wire.Entry, ended bool, err error) {
	for emptyManifest(es) {
		more, end, err := readManifestFrame(ctx, manifest)
		if err != nil || end {
			return es, end, err
		}
		es = append(es, more...)
	}
	return es, false, nil
}

// emptyManifest reports whether es lists nothing but the root.
func emptyManifest(es []wire.Entry) bool {
	for i := range es {
		if es[i].Path != "." {
			return false
		}
	}
	return true
}

// streamSync is fullSync's resync to a peer whose copy is empty (a first
// sync, a replaced disk): the tree is sent as it is read, never listed
// whole (builder.streamSync). The bytes and files planned grow with the
// walk: the total is known when it ends.
func (p *Primary) streamSync(kernel Kernel, bt *batcher, pl resyncPlan, run resyncRun, dropped []journal.File) error {
	p.Log.Info("resync: the peer's copy is empty: sending the tree as it is read")
	p.mu.Lock()
	p.rs.Phase = PhaseCopying
	p.mu.Unlock()
	ts := &treeSync{report: pl.report}
	b := newBuilder(p.root, p.Dev, nil, kernel, bt, p.Log, p.readBuf)
	b.onRead, b.stop = p.resyncRead, bt.ctx.Err
	tails := newTailFinder(dropped, p.Dev)
	files := 0
	var planned uint64
	count := func() {
		p.mu.Lock()
		p.rs.FilesTotal, p.rs.BytesPlanned = files, planned
		p.mu.Unlock()
	}
	tooLong, err := b.streamSync(func(fn func(*wire.Entry) error) (int, error) { return fstree.WalkGens(p.root, false, fn) }, ts,
		func(e *wire.Entry) {
			tails.see(e.Ino, e.Mode, e.Size)
			files++
			if e.Mode.IsRegular() {
				planned += e.Size
			}
			if files%1024 == 0 {
				count()
			}
		})
	if err != nil {
		return fmt.Errorf("sending %s: %w", p.Dir.Path, err)
	}
	count()
	if tooLong > 0 {
		p.Log.Warn("entries left out of the resync: their paths are longer than the wire takes",
			"entries", tooLong, "limit", wire.MaxPath)
	}
	p.resyncQueued(b, bt, ts, tails, run, files, 0)
	return nil
}

// resyncQueued ends a resync whose batches b has queued: the changes it
// took over from the journal are shipped beyond the sizes it saw (tails),
// the shadow is b's, and the peer is asked to confirm once it has
// applied them all.
func (p *Primary) resyncQueued(b *builder, bt *batcher, ts *treeSync, tails *tailFinder, run resyncRun, files, compared int) {
	b.beyondScan(tails.tails)
	bt.flush()
	// The report goes with the resync's end (ResyncDone), which the peer
	// writes once it has applied and synced everything before it. A
	// resync that did not end (a flush failed, the connection was cut)
	// had its discards applied, and the next one, finding those entries
	// gone or equal, reported nothing: what it reported is carried into
	// the next, until one ends (TestFailbackReportSurvivesInterruptedResync,
	// from a review). A line found again is not repeated.
	p.mu.Lock()
	all := slices.Clone(p.rsReport)
	p.mu.Unlock()
	seen := make(map[string]bool, len(all))
	for _, l := range all {
		seen[l] = true
	}
	for _, l := range ts.lines {
		if !seen[l] {
			seen[l] = true
			all = append(all, l)
		}
	}
	lines := all
	if len(lines) > maxReport {
		lines = append(lines[:maxReport:maxReport], fmt.Sprintf("... and %d more", len(all)-maxReport))
	}
	var report []byte
	if len(lines) > 0 {
		report = []byte(strings.Join(lines, "\n") + "\n")
	}
	p.mu.Lock()
	p.rsReport = all
	p.requeue(b.requeue) // beyond run.mark, which the pass mark below covers
	p.sh = b.sh
	p.asides = nil
	p.syncSeq = run.syncSeq
	if p.fullAsked == p.rsAsked {
		// Else asked again since this resync planned: another follows.
		p.needFull, p.forceAll = false, false
	}
	p.resyncGivenUp(b.gaveUp) // none so far: what it retries is new
	p.fullSyncEnd = p.out.last()
	if b.blocked == 0 {
		p.cover.set(run.mark, p.fullSyncEnd, b.beyondEOF > 0, run.start)
		p.marks.addPass(passMark{mark: run.mark, seq: p.fullSyncEnd, at: run.start})
	}
	p.fullSyncs++
	p.dataBytes += b.dataRead
	p.rs.Phase, p.rs.FilesSent, p.rs.Discarded = PhaseWaiting, ts.filesSent, len(all)
	p.out.resyncEnds(&wire.Frame{Type: wire.TypeSync, Flags: wire.FlagResyncDone, Seq: p.fullSyncEnd,
		Payload: wire.AppendResyncDone(nil, &wire.ResyncDone{Gen: run.gen, Report: report})})
	p.mu.Unlock()
	p.sendq.Broadcast()
	p.Log.Info("resync queued", "mode", run.mode, "files", files, "files_compared", compared,
		"files_sent", ts.filesSent, "bytes", b.dataRead, "discarded_entries", len(ts.lines),
		"took", time.Since(run.start).Round(time.Millisecond), "steps", run.steps())
}

// markRecent flags EntryRecent the regular files of local whose ctime or
// mtime is at or after cutoff (0: none), the files a resync compares by
// checksums, and returns their paths.
//
// The files under a directory that may have been moved in the window are
// flagged too, whatever their own times: moved over the one the peer
// holds under its path (`rm -r b.2; mv b.1 b.2`, a backup rotation while
// nothing captured it), its files, of the size and mtime the peer's old
// ones may have, would be trusted: the peer kept the removed files' bytes
// under the moved ones' names (TestResyncWindowDirRotated). See
// movedInWindow for which directories those are.
func markRecent(local *listing, cutoff int64) []string {
	if cutoff == 0 {
		return nil
	}
	recent := map[string]bool{}
	for i := range local.len() {
		if e := local.at(i); e.mode.IsDir() && e.ctime >= cutoff {
			recent[e.path] = true
		}
	}
	moved := map[string]bool{}
	for p := range recent {
		if movedInWindow(p, recent) {
			moved[p] = true
		}
	}
	return markCompared(local, func(e *lentry) bool {
		return e.ctime >= cutoff || e.mtime >= cutoff || underDir(moved, e.path)
	})
}

// markLateMoved flags EntryRecent the regular files under a directory
// that may have been moved while the resync scanned the tree, and returns
// their paths: late holds the inodes with marks recorded since the resync
// began. As movedInWindow, by the parent: a directory with such marks in
// a parent with such marks (a move changes the new parent's entries).
// The scan may have read the parent's times before the move, and the
// directory under its new name with the old one's files
// (TestResyncRotationDuringWindowScan).
func markLateMoved(local *listing, late map[uint64]bool) []string {
	if len(late) == 0 {
		return nil
	}
	changed := map[string]bool{}
	for i := range local.len() {
		if e := local.at(i); e.mode.IsDir() && late[e.ino] {
			changed[e.path] = true
		}
	}
	moved := map[string]bool{}
	for p := range changed {
		if p != "." && changed[path.Dir(p)] {
			moved[p] = true
		}
	}
	if len(moved) == 0 {
		return nil
	}
	return markCompared(local, func(e *lentry) bool { return underDir(moved, e.path) })
}

// movedInWindow says whether directory p, whose ctime is in the window,
// may have been moved there: recent holds the directories whose ctime is
// in the window. A move sets the moved directory's ctime, and its new
// parent's too (an entry of it changed), at the move; an entry made in
// the moved directory afterwards sets its mtime with its ctime, so its
// times alone do not tell it from a directory that only got an entry.
// Its parent's do: a directory whose entries changed in the window, in a
// parent whose entries did not, was not moved then (a file made in a
// mail spool or a volume: its other files are not read again). The root
// is never moved.
func movedInWindow(p string, recent map[string]bool) bool {
	return p != "." && recent[path.Dir(p)]
}

// underDir says whether a directory of dirs holds p, at any depth.
func underDir(dirs map[string]bool, p string) bool {
	if len(dirs) == 0 {
		return false
	}
	for p = path.Dir(p); ; p = path.Dir(p) {
		if dirs[p] {
			return true
		}
		if p == "." || p == "/" {
			return false
		}
	}
}

// markCompared flags EntryRecent the regular files of local not flagged
// yet for which compare holds, and returns their paths.
func markCompared(local *listing, compare func(*lentry) bool) []string {
	var paths []string
	for i := range local.len() {
		e := local.at(i)
		if e.mode.IsRegular() && e.flags&wire.EntryRecent == 0 && compare(e) {
			e.flags |= wire.EntryRecent
			paths = append(paths, e.path)
		}
	}
	return paths
}

// markMoved flags EntryRecent, as markRecent does, the regular files not
// flagged yet whose bitmap entry holds metadata marks only and whose
// ctime is not their mtime, and returns their paths: such an inode may
// have been renamed over the file the peer holds under its name (`mv
// log.1 log.2` while the peer was away; a rename moves the ctime), and
// its bitmap says nothing of that file's bytes. Compared by checksums, it
// is sent only where the two differ. (A chmod or chown while the peer was
// away makes a file one too: read on both sides, not sent.)
func markMoved(local *listing, d *dirtySet) []string {
	return markCompared(local, func(e *lentry) bool { return e.ctime != e.mtime && d.attrOnly(e.ino) })
}

// markBitmapCompared flags EntryRecent, in a resync that trusts bitmap d,
// the regular files whose marks do not say what the peer holds under
// their names, and returns their paths:
//   - those of markMoved;
//   - every file with marks (not made since: d.spans sends those whole)
//     in a directory with marks, whose entries may have changed while the
//     peer was away: a file may have been renamed over the one the peer
//     holds under its name (`mv log.1 log.2` after log.1 was written): its
//     marks are changes to its own copy, which the peer holds under
//     another name;
//   - every file, with marks or not, under a directory that was moved
//     (marks, and a ctime that is not its mtime: a rename moves the ctime,
//     a change of its entries both), which may have been renamed over the
//     directory the peer holds under its name (`rm -r b.2; mv b.1 b.2`).
//
// sh, when not nil, is the shadow of the peer's last session (a primary
// that ran on while the peer was away): the names the peer was given,
// by this side's inodes. A directory or file it holds under another name
// than it has now (a hard-linked file: under none of its names), or not
// at all, was moved or made since, whatever its
// times say: a directory moved and then given a new entry (`rm -r b.2;
// mv b.1 b.2; touch b.2/stamp`) has its ctime equal to its mtime again,
// and its files, with the size and mtime the peer's old ones have, were
// trusted (TestResyncBitmapDirRotatedThenEntryAdded). The shadow may say
// more than the peer applied (batches in flight when it left): it only
// adds files to compare, never takes one away. The inodes the bitmap
// marks moved are taken as renamed too, shadow or not: those a pass
// renamed in batches the peer had not made durable (the shadow had
// moved on), and, after a clean stop, those the shadow no longer named
// by their paths (Primary.flagMoved); and the directories whose
// metadata changed while the primary held no shadow (blind marks: a term
// before its first resync, after a start or a handover) in a directory
// whose entries changed too (movedInWindow), whatever their times say.
// It also returns the inodes, not made since, that only the shadow told
// as moved (the resync marks them: Primary.noteMoved).
func markBitmapCompared(local *listing, d *dirtySet, sh *shadow) (paths []string, shadowMoved []uint64) {
	paths = markMoved(local, d)
	byShadow := map[uint64]bool{}
	renamed := func(e *lentry) bool {
		if d.wasMoved(e.ino) {
			return true
		}
		if sh == nil || sh.hasPath(e.ino, e.path) {
			return false
		}
		if f := d.files[e.ino]; (f == nil || f.born == 0) && !byShadow[e.ino] {
			byShadow[e.ino] = true
			shadowMoved = append(shadowMoved, e.ino)
		}
		return true
	}
	changed, moved := map[string]bool{}, map[string]bool{}
	for i := range local.len() {
		if e := local.at(i); e.mode.IsDir() && d.has(e.ino) {
			changed[e.path] = true
		}
	}
	for i := range local.len() {
		e := local.at(i)
		if !e.mode.IsDir() || e.path == "." {
			continue
		}
		if d.has(e.ino) && e.ctime != e.mtime {
			moved[e.path] = true
		}
		// Blind: as movedInWindow, a directory moved has its new
		// parent's entries changed too.
		if d.isBlind(e.ino) && changed[path.Dir(e.path)] {
			moved[e.path] = true
		}
		if renamed(e) {
			moved[e.path] = true
		}
	}
	paths = append(paths, markCompared(local, func(e *lentry) bool {
		f := d.files[e.ino]
		return (f == nil || f.born == 0) && renamed(e)
	})...)
	if len(changed) == 0 && len(moved) == 0 {
		return paths, shadowMoved
	}
	return append(paths, markCompared(local, func(e *lentry) bool {
		f := d.files[e.ino]
		if f != nil && f.born != 0 {
			return false
		}
		return (f != nil && changed[path.Dir(e.path)]) || underDir(moved, e.path)
	})...), shadowMoved
}

// fineSumBudget bounds the checksums of a resync's wanted files (16 bytes
// each, held by both listings; the peer widens a file's blocks where its
// own copy would pass it, see fineShifts): within it they are of blocks as small as
// the bitmap's chunks, so that a file changed in a few places is sent as
// a few 4 KiB blocks, not as 64 KiB ones (the bitmap resync after a clean
// restart sent 4.96 times rsync's bytes with 64 KiB blocks). Past it,
// files get the 64 KiB blocks of before.
var fineSumBudget uint64 = 1 << 20 // a variable for tests

// pickShifts gives each wanted path (the regular files markCompared
// flagged, in local) the smallest block its checksums can have within
// budget sums in all, taking the files in listing order (fineShifts.take),
// sets it on the local entry (which is summed with it) and returns the
// shifts in the order of paths.
func pickShifts(local *listing, paths []string, budget uint64) []uint8 {
	by := make(map[string]uint8, len(paths))
	fs := fineShifts{left: budget}
	for i := range local.len() {
		e := local.at(i)
		if !e.mode.IsRegular() || e.flags&wire.EntryRecent == 0 {
			continue
		}
		e.shift = fs.take(wire.MinBlockShift, e.size)
		by[e.path] = e.shift
	}
	shifts := make([]uint8, len(paths))
	for i, p := range paths {
		shifts[i] = by[p]
	}
	return shifts
}

// fineShifts hands out a budget of checksums of blocks smaller than 64
// KiB: the requester (pickShifts) for its copies, and the answering node
// (walkManifest) for its own, which may be bigger (a file truncated on
// the requester while this node was away), each in listing order. Both
// keep to it, so that neither the manifest nor the listings grow past it
// with the small blocks; files that get 64 KiB blocks cost what they did
// before and are not counted (one big file would spend the budget of all
// the others).
type fineShifts struct{ left uint64 }

// take returns the smallest shift from shift on (0: none asked) whose
// checksums of size bytes fit what is left, and counts them; or
// wire.BlockShift (0 if none was asked) when none under it fits.
func (f *fineShifts) take(shift uint8, size uint64) uint8 {
	if shift == 0 {
		return 0
	}
	for ; shift < wire.BlockShift; shift++ {
		if n := (size + 1<<shift - 1) >> shift; n <= f.left {
			f.left -= n
			return shift
		}
	}
	return wire.BlockShift
}

// blockShift is the block shift s stands for (0: wire.BlockShift).
func blockShift(s uint8) uint8 {
	if s == 0 {
		return wire.BlockShift
	}
	return s
}

// sumCompared gives checksums, in a resync that does not compare every
// file, to the local files flagged recent (markRecent) and those whose
// peer copy has them, where they have none yet (localSums.feedRecent
// summed the recent ones but those it found moved), and returns how many
// it compares. A file moved or replaced since the scan stays without
// (fstree.SumEntry), and fileSpans sends it whole.
func sumCompared(root *os.File, local, peer *listing) (int, error) {
	summed := map[string]uint8{} // the peer's summed files: their block shift
	for i := range peer.len() {
		if e := peer.at(i); e.flags&wire.EntrySummed != 0 {
			summed[e.path] = e.shift
		}
	}
	compared := 0
	for i := range local.len() {
		e := local.at(i)
		ps, peerSummed := summed[e.path]
		if e.mode.IsRegular() && (e.flags&wire.EntryRecent != 0 || peerSummed) {
			if peerSummed && blockShift(ps) < blockShift(e.shift) {
				// Smaller blocks than asked (64 KiB for a file not
				// named): summing them here would pass this side's
				// budget. Left without checksums, sent whole.
				e.flags &^= wire.EntrySummed
				e.sums = nil
				compared++
				continue
			}
			if peerSummed && e.flags&wire.EntrySummed != 0 && blockShift(e.shift) != blockShift(ps) {
				// Summed here in smaller blocks than there (the peer's
				// copy is much bigger, see fineShifts): again, as the
				// peer did.
				e.flags &^= wire.EntrySummed
				e.sums = nil
			}
			if peerSummed {
				e.shift = ps
			}
			if e.flags&wire.EntrySummed == 0 {
				if err := e.sum(root); err != nil {
					return 0, err
				}
			}
			compared++
		}
	}
	return compared, nil
}

// escalate turns the resync in progress into a full comparison.
func (p *Primary) escalate(why string) error {
	p.mu.Lock()
	p.forceAll = true
	p.mu.Unlock()
	p.Log.Warn("resync: comparing every file", "why", why)
	return errors.New("resync restarts as a full comparison: " + why)
}

func (p *Primary) setPhase(phase string, files int) {
	p.mu.Lock()
	p.rs.Phase, p.rs.FilesTotal = phase, files
	p.mu.Unlock()
}

// resyncRead counts the bytes a resync reads for sending, and holds it to
// the configured rate so that live changes keep the link.
func (p *Primary) resyncRead(n int) {
	sent := p.rsSent.Add(uint64(n))
	rate := p.term.Rate
	if rate <= 0 {
		return
	}
	p.mu.Lock()
	started := p.rs.Started
	p.mu.Unlock()
	due := started.Add(time.Duration(float64(sent) / float64(rate) * float64(time.Second)))
	if d := time.Until(due); d > 0 {
		time.Sleep(d)
	}
}

// finishResync: the peer acknowledged a resync's end, every batch up to
// seq durable. If that is the end of the resync in progress, the peer's
// copy follows this term's generation, and the bitmap is exact from now on.
func (p *Primary) finishResync(seq uint64) {
	p.mu.Lock()
	if !p.rs.Active || p.rs.Phase != PhaseWaiting || seq < p.fullSyncEnd {
		// The end of an earlier resync, acknowledged after the next one
		// began (a request made during the earlier one: fullAsked): it
		// does not end this one, whose scan may not have covered what
		// the request stands for (TestEarlierResyncEndDoesNotEndTheNext,
		// from a review), nor, once that one queued its own end, whose
		// batches the peer may not hold yet
		// (TestEarlierResyncEndAfterNextQueuedItsEnd). The peer
		// acknowledges an end with its number at least.
		p.mu.Unlock()
		return
	}
	p.lin.caughtUp() // untracked changes: compared by this resync
	if p.fullAsked == p.rsAsked {
		// Records lost since this resync planned are not covered by it.
		p.dirty.lost = false
	}
	p.resyncsEnded++
	p.rs.Active, p.rs.Phase, p.rs.Ended = false, "done", time.Now()
	p.rsSince = time.Time{}
	p.rsReport = nil
	p.rs.BytesSent = p.rsSent.Load()
	rs, gen, ms := p.rs, p.lin.gen, p.meta
	p.mu.Unlock()
	if ms != nil {
		// The flag is read in the update: diskFailed sets it before it
		// marks the copy Crashed, under the same lock.
		if err := ms.Update(func(m *Meta) { m.Base, m.Crashed, m.Untracked = gen, p.diskFailed.Load(), 0 }); err != nil {
			p.Log.Error("recording the resync", "err", err)
		}
	}
	p.Log.Info("resync complete: the peer is a mirror", "mode", rs.Mode, "files", rs.FilesTotal,
		"files_compared", rs.FilesCompared, "files_sent", rs.FilesSent, "bytes", rs.BytesSent,
		"took", rs.Ended.Sub(rs.Started).Round(time.Millisecond))
	if p.OnResyncDone != nil {
		p.OnResyncDone()
	}
}

// fileShipped records a file a resync finished. Safe for concurrent use.
func (p *Primary) fileShipped(ino, mark uint64) {
	p.mu.Lock()
	// Its last ops are in the batch being filled, the next to be queued.
	p.marks.addFile(ino, mark, p.out.next)
	p.mu.Unlock()
}

// clearDirty forgets the changes the peer holds durably, at most every
// clearEvery unless forced. Called with p.mu held.
func (p *Primary) clearDirty(force bool) {
	p.marks.apply(p.dirty, p.out.durable, force, time.Now())
	if peak := p.dirty.peak; p.dirty.shrink() {
		p.Log.Info("modification bitmap: a burst's marks are gone, memory handed back", "files_at_peak", peak, "files", len(p.dirty.files))
		// A burst's marks are gone (and the journal's room for them,
		// let go when the pass took them): the runtime would hand the
		// memory back to the system only slowly, its goal set by the
		// heap before.
		go debug.FreeOSMemory()
	}
}

// maxForget bounds the chunk marks waiting to be dropped.
const maxForget = 1 << 16

// forgetLoop drops, every few milliseconds while no peer is connected, the
// kernel's marks of the chunks just recorded. Nobody reads them until the
// peer returns, and a write next to a live mark is announced with some
// look-ahead (for sequential writers): the bitmap would then mark bytes
// that were never written, and the resync would send them.
func (p *Primary) forgetLoop(ctx context.Context, kernel Kernel) {
	if kernel == nil {
		return
	}
	every(ctx, 5*time.Millisecond, func() {
		p.mu.Lock()
		keys := p.forgetKeys
		p.forgetKeys = nil
		p.mu.Unlock()
		if len(keys) > 0 {
			kernel.ForgetChunks(keys)
		}
	})
}

// every runs f every d until ctx ends.
func every(ctx context.Context, d time.Duration, f func()) {
	t := time.NewTicker(d)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f()
	}
}

// keeper asks the peer to sync what it acknowledged (in the background,
// beside its applying), forgets what it made durable, and moves this copy's
// sync point on: every syncEvery.
func (p *Primary) keeper(ctx context.Context, kernel Kernel) {
	// Every second during a resync, so that an interrupted one resumes
	// close to where it stopped.
	var last time.Time
	every(ctx, time.Second, func() {
		p.mu.Lock()
		due := p.rs.Active || time.Since(last) >= syncEvery
		target := p.out.acked
		if due && p.connected {
			p.out.askLazy()
			p.sendq.Broadcast()
		}
		p.mu.Unlock()
		if !due {
			return
		}
		last = time.Now()
		// The point moves to what this sync covers: wait (briefly) for
		// its acknowledgement.
		for i := 0; i < 100 && ctx.Err() == nil; i++ {
			p.mu.Lock()
			ok := p.out.durable >= target || !p.connected
			p.mu.Unlock()
			if ok {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		p.moveSyncPoint(kernel)
	})
}

// moveSyncPoint records the newest time before which every change of this
// copy is on its disk and durable on the peer: what a crash of this node
// must compare from.
func (p *Primary) moveSyncPoint(kernel Kernel) {
	if p.diskFailed.Load() {
		return // what the failed filesystem held may be lost: the point stays
	}
	t0 := time.Now()
	if kernel != nil && kernel.Drain() != nil {
		return // changes before t0 may be in no record: the point stays
	}
	p.mu.Lock()
	p.clearDirty(true)
	var point time.Time
	// needFull: a resync is owed, for changes the peer may lack that are
	// in no queue (handed to a resync, or batches the peer lost).
	if p.lin.follows() && p.connected && !p.needFull {
		if p.j.Pending() == 0 && p.out.settled() && !p.building && p.pendingSince.IsZero() {
			point = t0
		} else {
			point = p.marks.newest.at
		}
	}
	seq, ms := p.out.durable, p.meta
	p.mu.Unlock()
	if point.IsZero() || ms == nil {
		return
	}
	// Everything written before t0 (≥ point) is on this disk after it.
	if err := syncfs(p.Dir.Path); err != nil {
		p.Log.Warn("syncfs for the sync point", "err", err)
		return
	}
	ms.Update(func(m *Meta) {
		if at := inReckoning(point); at > m.SyncTime {
			m.SyncTime, m.SyncSeq = at, seq
		}
	})
}

// SaveDirty writes the bitmap for the next term, at a clean stop. A
// bitmap that is not trusted is not saved: the next term compares the
// files changed since the sync point instead.
func (p *Primary) SaveDirty() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.meta == nil {
		return nil
	}
	p.clearDirty(true)
	if !p.lin.trusted {
		os.Remove(p.term.DirtyPath)
		return nil
	}
	if n := p.flagMoved(); n > 0 {
		p.Log.Info("modification bitmap: entries the peer may hold under other paths, compared by checksums at the next resync", "entries", n)
	}
	p.Log.Info("modification bitmap saved for the next term", "bytes", p.dirty.bytes(), "files", len(p.dirty.files))
	if err := p.dirty.save(p.term.DirtyPath, p.lin.base); err != nil {
		return err
	}
	// What nothing captured starts when the capture stopped being read,
	// not at the bitmap's save (BeginTerm takes the file's time), which
	// waits for the term's goroutines: a resync summing files held it up
	// for as long as that took, and a change made meanwhile was in
	// neither (TestChangeBetweenCaptureStopAndBitmapSave, from a review).
	// Only for a copy that is the source: a node that handed the role
	// over holds nothing its peer lacks, and a window left there widened
	// every later term's comparison, however long after
	// (TestHandoverLeavesNoUntrackedWindow, from a review).
	if !p.readUntil.IsZero() {
		at := inReckoning(p.readUntil)
		return p.meta.Update(func(m *Meta) {
			if m.Source && (m.Untracked == 0 || at < m.Untracked) {
				m.Untracked = at
			}
		})
	}
	return nil
}

// flagMoved marks moved in the bitmap (noteMoved) the inodes with marks
// that the next term's shadow, scanned from the tree as it is then, would
// not tell as moved, and returns how many it marked. At a clean stop the
// shadow holds the names the peer was given (no pass moves it while the
// peer is away; the renames of passes and resyncs not yet durable are
// marked already); the next term has only the times, and a directory
// rotated while the peer was away (`rm -r b.2; mv b.1 b.2; touch
// b.2/stamp`), whose ctime is its mtime again, would be trusted to the
// bitmap: the peer would keep the old b.2's files under the moved ones'
// names. Marked:
//   - a directory whose path in the shadow no longer leads to it;
//   - an inode the shadow does not hold and that was not made since: a
//     directory moved into the tree from elsewhere on the filesystem
//     (changes outside the tree are recorded too, and marked alike: no
//     resync lists them).
//
// Files are left to their times and their directories' marks
// (markBitmapCompared): a rename sets a file's ctime, a later write its
// data marks in a directory with marks. So the stop costs a lookup in the
// shadow for each inode with marks and one stat for each directory with
// marks, not one for each file read while the peer was away (each read
// marks a file once a day under relatime). Called with p.mu held, no pass
// running.
func (p *Primary) flagMoved() int {
	if p.sh == nil || p.root == nil {
		return 0
	}
	var moved []uint64
	for ino, f := range p.dirty.files {
		if f.born != 0 || f.moved != 0 || f.attr == 0 && f.whole == 0 {
			continue
		}
		kn, ok := p.sh.node(ino)
		if ok && !kn.mode.IsDir() {
			continue
		}
		if ok {
			name, named := p.sh.path(ino)
			if named && name == "." {
				continue
			}
			if named {
				st, err := fstree.Stat(p.root, name)
				if err == nil && st.Ino == ino {
					continue
				}
			}
		}
		moved = append(moved, ino)
	}
	p.noteMoved(moved, p.added)
	return len(moved)
}

// noteMoved marks inos moved in the bitmap (dirtySet.setMoved): the peer
// may hold them under other paths than they have now. The mark counts as
// a change made after count (the pass or resync that shipped their
// renames took changes up to count): forgotten once a pass taken later
// is durable on the peer, not by a mark of the same count, which an
// earlier pass whose batches precede the renames may have left (a pass
// retaking what the last one requeued takes no new change). Called with
// p.mu held.
func (p *Primary) noteMoved(inos []uint64, count uint64) {
	for _, ino := range inos {
		if f := p.dirty.files[ino]; f != nil && f.born != 0 {
			continue // made since: sent whole wherever the peer holds a file under its name
		}
		p.dirty.setMoved(ino, count+1)
	}
}

// ClockStepped moves this term's lineage times back by d: this host's
// clock was set back by d (MetaStore.ClockStepped does the same for the
// copy's saved times, which the next term starts from).
func (p *Primary) ClockStepped(d time.Duration) {
	p.mu.Lock()
	p.lin.clockStepped(d)
	p.marks.clockStepped(d)
	p.mu.Unlock()
}

// HandedOver records, after every change reached the peer durably at a
// handover, that this copy is now a consistent replica of the generation
// the peer continues from.
func (p *Primary) HandedOver() error {
	p.mu.Lock()
	ok := p.meta != nil && p.lin.follows() && p.connected && !p.needFull && p.j.Pending() == 0 && p.out.settled() &&
		!p.building && len(p.asides) == 0 && !p.diskFailed.Load()
	ms := p.meta
	p.mu.Unlock()
	if !ok {
		return nil
	}
	if err := syncfs(p.Dir.Path); err != nil {
		return err
	}
	now := time.Now().UnixNano()
	return ms.Update(func(m *Meta) {
		if p.diskFailed.Load() {
			return // failed since the check above (diskFailed sets it before Crashed)
		}
		m.Source, m.Consistent, m.Crashed, m.SyncTime = false, true, false, now
		// Nothing this node made is missing on the peer: no window of
		// its own to compare when it is the source again.
		m.Untracked = 0
	})
}

// syncfs writes back the filesystem holding dir (the root is an O_PATH
// descriptor, which syncfs refuses).
func syncfs(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}

// scanTail is a change a resync took over and the size its scan saw of
// the file.
type scanTail struct {
	f    journal.File
	size uint64
}

// tailFinder finds the journal's changes with data a resync of the tree
// on one device took over, with the sizes its scan saw of their files,
// for beyondScan.
type tailFinder struct {
	want  map[uint64]journal.File
	tails []scanTail
}

func newTailFinder(dropped []journal.File, dev uint32) *tailFinder {
	t := &tailFinder{}
	for _, f := range dropped {
		if f.Key.Dev == dev && !f.Data.Empty() {
			if t.want == nil {
				t.want = map[uint64]journal.File{}
			}
			t.want[f.Key.Ino] = f
		}
	}
	return t
}

// see is told of every entry of the scan.
func (t *tailFinder) see(ino uint64, mode fs.FileMode, size uint64) {
	if f, ok := t.want[ino]; ok && mode.IsRegular() {
		t.tails = append(t.tails, scanTail{f, size})
		delete(t.want, ino) // one name of several links is enough
	}
}

// beyondScan queues the ranges of the changes a resync took over that lie
// beyond the size its scan saw (scanTails): a buffered write is reported
// before it moves the file's size, so one in progress when the scan read
// the file was not read whole. Such bytes are then shipped, or given up
// like any bytes beyond EOF once a truncate is shown to have removed them.
func (b *builder) beyondScan(tails []scanTail) {
	for _, t := range tails {
		b.beyondWhole(t.f, t.size)
	}
}
