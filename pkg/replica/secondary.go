package replica

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// Dir is one replicated directory as a node knows it.
type Dir struct {
	Name string // the same on both nodes
	Path string // local path
}

// Server accepts peer connections: batches for replicas (when this node is
// the secondary) and manifest requests (either role, for verify).
type Server struct {
	Link     *peerlink.Link
	StateDir string
	Dirs     []Dir
	Log      *slog.Logger
	// Metas holds each directory's copy state (by name); a directory
	// without one announces an unknown copy (a full comparison).
	Metas map[string]*MetaStore
	// Stages, if set, times applying batches and flushing for sync
	// requests.
	Stages *latency.Stages
	// PeerAddrs are the addresses the peer connects from (its addresses
	// in the configuration). Their connections in a handshake are not
	// counted in maxUnauthenticated, only in maxUnauthenticatedFrom:
	// strangers with many addresses can fill the shared places but not
	// the peer's. A peer that connects from another address shares them.
	PeerAddrs []netip.Addr
	// Admit, if set, is asked about each replication stream with the
	// sending primary's cluster epoch (0: not sent): a reason to refuse
	// it, or "". The node refuses a primary whose epoch is older than
	// its own copy's while it does not count its copy stale: such a
	// primary is about to step down for this copy (cluster.Machine's
	// Shared), or this node has yet to hear that it must not (its
	// heartbeats); its resync would replace what this copy's term
	// acknowledged.
	Admit func(epoch uint64) string

	accept   atomic.Bool        // replicas take batches; a serving node does not
	syncfs   func(fd int) error // the appliers' syncfs when set (a test fails it)
	unsealed bool               // tests: a server from before sealed frames (wire.FlagSealed)
	bgSync   func()             // tests: runs first in a background sync
	sealed   atomic.Uint64      // sealed frames received (tests)
	handlers sync.WaitGroup     // connections being served

	// handshakes counts the connections in their handshake, in all and
	// by remote address (see maxUnauthenticated); failedLog and fullLog
	// space the warnings about them.
	hsMu               sync.Mutex
	handshakes         int
	handshakesFrom     map[netip.Addr]int
	failedLog, fullLog rateLog

	mu       sync.Mutex
	replicas map[string]*replicaState
	stats    map[string]*ServerStats
}

// ServerStats are the secondary's counters for one directory.
type ServerStats struct {
	Connected  atomic.Bool
	Peer       atomic.Value // string
	Batches    atomic.Uint64
	Ops        atomic.Uint64
	Applied    atomic.Uint64
	LastError  atomic.Value // string
	LastUpdate atomic.Int64 // unix ns
	ApplyNs    atomic.Int64 // total time applying ops
	SyncNs     atomic.Int64 // total time making applied batches durable
	Syncs      atomic.Uint64
}

// replicaState is what a secondary persists per directory: the sender's
// session, the last batch fully applied and how far into the next one it
// got, so that a replay after a restart resumes at the exact op.
type replicaState struct {
	mu  sync.Mutex // one replication connection at a time
	cmu sync.Mutex // guards active and gen; see session
	// active is the connection holding mu; gen counts the connections
	// that came for it, so that one waiting for mu knows whether a newer
	// one replaced it meanwhile.
	active net.Conn
	gen    uint64
	file   *os.File
	// session and applied are written holding mu and cmu: the connection
	// holding mu reads them as it likes, a handshake under cmu (waiting
	// for mu would wait for the connection it replaces).
	session uint64
	applied uint64
	partial uint64 // batch applied[+1] ...
	ops     uint32 // ... up to this many ops
	boot    [16]byte
	mnt     uint64 // the replica's mount (mountID)
	// broken: a flush of this connection failed (Linux reports a
	// writeback error once: a later flush may succeed without the lost
	// pages), so nothing it applied may be trusted as durable (see
	// distrust). Cleared when a connection starts; once set, saves write
	// no progress. fmu serialises the file's writes: a background sync
	// that fails empties the file (forget) while the connection's
	// goroutine holds mu.
	broken atomic.Bool
	fmu    sync.Mutex
	// filed is the progress the file holds (the last save that
	// succeeded): what a restart resumes from.
	filed struct {
		session, applied, partial uint64
		ops                       uint32
	}
}

// unsave puts the progress back to what the file holds, after a save
// failed: the next connection must resume where a restart would, or a
// kill before its next save replays ops that were applied on top of ops
// that were not saved (a truncate, then a rename over its path). The
// caller holds mu.
func (r *replicaState) unsave() {
	if r.filed.session != r.session {
		r.setProgress(r.session, 0)
		r.partial, r.ops = 0, 0
		return
	}
	r.setProgress(r.session, r.filed.applied)
	r.partial, r.ops = r.filed.partial, r.filed.ops
}

const stateSize = 8 + 8 + 8 + 4 + 16 + 8 + 4

// mountID names the mount the replica's directory is on: the unique
// mount id (Linux 6.8), else the reusable one, else 0. The filesystem
// unmounted and mounted again gives another: its page cache was lost if
// it had shut down (a disk error, not a reboot), so the saved progress,
// whose batches may never have reached the disk, is no longer true (a
// review: a restarted secondary resumed after a batch its filesystem had
// lost, and acknowledged it durable, TestResumeAfterCacheLostWithoutReboot).
// A symlink is followed, as the applier's root is (a path linked to
// another filesystem: TestResumeAfterCacheLostSymlinkedPath).
func mountID(path string) uint64 {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_MNT_ID_UNIQUE, &stx); err != nil {
		return 0
	}
	if stx.Mask&(unix.STATX_MNT_ID_UNIQUE|unix.STATX_MNT_ID) == 0 {
		return 0
	}
	return stx.Mnt_id
}

// bootID is read once: it does not change while the daemon runs, and
// the state is saved after every batch.
var bootID = sync.OnceValue(func() [16]byte {
	var id [16]byte
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err == nil {
		copy(id[:], bytes.ReplaceAll(bytes.TrimSpace(b), []byte("-"), nil))
	}
	return id
})

func (s *Server) state(name string) (*replicaState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.replicas == nil {
		s.replicas = map[string]*replicaState{}
	}
	if r := s.replicas[name]; r != nil {
		return r, nil
	}
	if err := os.MkdirAll(s.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(s.StateDir, "replica-"+name+".state"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state file: %w", err)
	}
	r := &replicaState{file: f}
	if d, ok := s.dir(name); ok {
		r.mnt = mountID(d.Path)
	}
	buf := make([]byte, stateSize)
	if n, _ := f.ReadAt(buf, 0); n == stateSize &&
		crc32.Checksum(buf[:stateSize-4], castagnoli) == binary.LittleEndian.Uint32(buf[stateSize-4:]) {
		le := binary.LittleEndian
		r.session, r.applied, r.partial, r.ops = le.Uint64(buf), le.Uint64(buf[8:]), le.Uint64(buf[16:]), le.Uint32(buf[24:])
		copy(r.boot[:], buf[28:44])
		// After a reboot the page cache is gone and with it any order
		// between applied ops: only a full comparison is safe. So after
		// the replica's filesystem was mounted again (mountID). And
		// after a crash of the daemon (the copy's running marker was
		// left: Meta.Crashed): what it applied and did not flush may be
		// lost though the page cache kept it, by a writeback error while
		// it was down that another descriptor took (another process's
		// syncfs, this daemon's connection of another directory on the
		// same filesystem). Linux reports it once, not to a descriptor
		// opened after, so the restarted daemon's first flush succeeded
		// and acknowledged the lost batches durable (a review,
		// forty-sixth session: TestS46RestartAfterKillMissesWritebackErrorSeenElsewhere,
		// TestS46RestartAfterKillOtherDirSeesErrorFirst). Not resumed,
		// the session is lost: the primary resyncs from its bitmap,
		// which keeps every change the peer did not make durable.
		if r.boot != bootID() || le.Uint64(buf[44:]) != r.mnt || s.crashed(name) {
			r.session, r.applied, r.partial, r.ops = 0, 0, 0, 0
		}
		r.filed.session, r.filed.applied, r.filed.partial, r.filed.ops = r.session, r.applied, r.partial, r.ops
	}
	s.replicas[name] = r
	return r, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crashed reports whether directory name's copy was left by a daemon that
// did not stop cleanly (Meta.Crashed). The caller holds s.mu.
func (s *Server) crashed(name string) bool {
	ms := s.Metas[name]
	return ms != nil && ms.Get().Crashed
}

// progress returns the session and the last batch applied.
func (r *replicaState) progress() (session, applied uint64) {
	r.cmu.Lock()
	defer r.cmu.Unlock()
	return r.session, r.applied
}

// setProgress records a new session or applied batch; the caller holds mu.
func (r *replicaState) setProgress(session, applied uint64) {
	r.cmu.Lock()
	defer r.cmu.Unlock()
	r.session, r.applied = session, applied
}

// errFlushFailed refuses a save after a failed flush (replicaState.broken).
var errFlushFailed = errors.New("a flush of the replica failed: its progress is not recorded")

// save records progress. It is a pwrite into the page cache, ordered before
// the batch's syncfs when the state lives on the replica's filesystem.
func (r *replicaState) save() error { return r.store(false) }

// store is save; force writes even after a failed flush (distrust's
// forgotten progress).
func (r *replicaState) store(force bool) error {
	r.fmu.Lock()
	defer r.fmu.Unlock()
	if r.broken.Load() && !force {
		return errFlushFailed
	}
	buf := make([]byte, stateSize)
	le := binary.LittleEndian
	le.PutUint64(buf, r.session)
	le.PutUint64(buf[8:], r.applied)
	le.PutUint64(buf[16:], r.partial)
	le.PutUint32(buf[24:], r.ops)
	r.boot = bootID()
	copy(buf[28:44], r.boot[:])
	le.PutUint64(buf[44:], r.mnt)
	le.PutUint32(buf[stateSize-4:], crc32.Checksum(buf[:stateSize-4], castagnoli))
	if _, err := r.file.WriteAt(buf, 0); err != nil {
		return err
	}
	r.filed.session, r.filed.applied, r.filed.partial, r.filed.ops = r.session, r.applied, r.partial, r.ops
	return nil
}

// forget empties the state file at once after a background flush failed,
// without mu (the connection's goroutine holds it, applying): until that
// goroutine distrusts the copy, a restart must not resume from the file.
// It reads as no progress.
func (r *replicaState) forget() error {
	r.broken.Store(true)
	r.fmu.Lock()
	defer r.fmu.Unlock()
	return r.empty()
}

// empty truncates the state file, or removes it. The caller holds fmu.
func (r *replicaState) empty() error {
	terr := r.file.Truncate(0)
	if terr == nil {
		return nil
	}
	if rerr := os.Remove(r.file.Name()); rerr != nil {
		return fmt.Errorf("truncating %s: %v; removing it: %v", r.file.Name(), terr, rerr)
	}
	return nil
}

// Stats returns the counters of directory name.
func (s *Server) Stats(name string) *ServerStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stats == nil {
		s.stats = map[string]*ServerStats{}
	}
	st := s.stats[name]
	if st == nil {
		st = &ServerStats{}
		st.Peer.Store("")
		st.LastError.Store("")
		s.stats[name] = st
	}
	return st
}

func (s *Server) dir(name string) (Dir, bool) {
	for _, d := range s.Dirs {
		if d.Name == name {
			return d, true
		}
	}
	return Dir{}, false
}

// SetAccept turns replication on (this node is a replica) or off (it
// serves, or stops): off also ends the replication connections in
// progress, each with a last durable acknowledgement (the primary's bitmap
// then forgets what this copy holds).
func (s *Server) SetAccept(on bool) {
	s.accept.Store(on)
	if on {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.replicas {
		r.cmu.Lock()
		if r.active != nil {
			r.active.SetReadDeadline(time.Now())
			r.active.SetWriteDeadline(time.Now().Add(2 * time.Second))
		}
		r.cmu.Unlock()
	}
}

// Limits on the connections whose peer has not proved it knows the key:
// anyone who reaches the listen address can open them.
const (
	// maxUnauthenticated bounds those in their handshake at once, and
	// maxUnauthenticatedFrom those from one address; more are closed as
	// they come. The primary and verify need one each: a stranger who
	// takes every place of its own address leaves the primary's free,
	// and strangers with many addresses who take all the shared places
	// leave the places of the peer's configured addresses (PeerAddrs).
	maxUnauthenticated     = 64
	maxUnauthenticatedFrom = 4
	// handshakeTimeout bounds a handshake: a peer that says nothing
	// gives its place back then.
	handshakeTimeout = 10 * time.Second
	// handshakeLogEvery spaces the warnings about failed or refused
	// handshakes: a flood of them costs a line per interval.
	handshakeLogEvery = 10 * time.Second
)

// Serve accepts peer connections until ctx ends.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		from := remoteAddr(c)
		if !s.admit(from) {
			if ok, held := s.fullLog.allow(time.Now(), handshakeLogEvery); ok {
				s.Log.Warn("too many peer connections in their handshake: closing new ones at once",
					"remote", c.RemoteAddr().String(), "limit", maxUnauthenticated, "limit_per_address", maxUnauthenticatedFrom,
					"closed_unlogged", held)
			}
			c.Close()
			continue
		}
		s.handlers.Add(1)
		go func() {
			defer s.handlers.Done()
			s.handle(ctx, c, from)
		}()
	}
}

// Close stops taking batches and waits (up to wait) for the connections in
// progress to end: a replica syncs what it applied as its connection ends.
func (s *Server) Close(wait time.Duration) {
	s.SetAccept(false)
	done := make(chan struct{})
	go func() {
		s.handlers.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(wait):
		s.Log.Warn("peer connections still open at stop")
	}
}

// remoteAddr is the address c comes from (the zero Addr if not IP).
func remoteAddr(c net.Conn) netip.Addr {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// admit takes a handshake place for a connection from a, if one is free.
func (s *Server) admit(a netip.Addr) bool {
	s.hsMu.Lock()
	defer s.hsMu.Unlock()
	peer := slices.Contains(s.PeerAddrs, a)
	if !peer && s.handshakes >= maxUnauthenticated || s.handshakesFrom[a] >= maxUnauthenticatedFrom {
		return false
	}
	if s.handshakesFrom == nil {
		s.handshakesFrom = map[netip.Addr]int{}
	}
	if !peer {
		s.handshakes++
	}
	s.handshakesFrom[a]++
	return true
}

// release gives back the handshake place of a connection from a.
func (s *Server) release(a netip.Addr) {
	s.hsMu.Lock()
	defer s.hsMu.Unlock()
	if !slices.Contains(s.PeerAddrs, a) {
		s.handshakes--
	}
	if s.handshakesFrom[a]--; s.handshakesFrom[a] == 0 {
		delete(s.handshakesFrom, a)
	}
}

func (s *Server) handle(ctx context.Context, raw net.Conn, from netip.Addr) {
	defer raw.Close()
	raw.SetDeadline(time.Now().Add(handshakeTimeout))
	c, err := s.Link.Server(ctx, raw)
	if err != nil {
		s.release(from)
		if ok, held := s.failedLog.allow(time.Now(), handshakeLogEvery); ok {
			s.Log.Warn("peer handshake failed", "remote", raw.RemoteAddr().String(), "err", err, "failed_unlogged", held)
		}
		return
	}
	defer c.Close()
	var dirName string
	var refuse string
	var told wire.Welcome // what the welcome said of this copy's progress
	h, err := wire.ServerHandshake(c, s.Link.Keys(), func(h wire.Hello) wire.Welcome {
		dirName = h.Dir
		if _, ok := s.dir(h.Dir); !ok {
			refuse = fmt.Sprintf("no replicated directory named %q on this node", h.Dir)
			return wire.Welcome{}
		}
		if h.Purpose == wire.PurposeReplicate {
			if !s.accept.Load() {
				refuse = notReplica
				return wire.Welcome{}
			}
			if s.Admit != nil {
				if why := s.Admit(h.Epoch); why != "" {
					refuse = why
					return wire.Welcome{}
				}
			}
			r, err := s.state(h.Dir)
			if err != nil {
				refuse = err.Error()
				return wire.Welcome{}
			}
			var w wire.Welcome
			w.Session, w.Applied = r.progress()
			told = w
			w.Sealed = peerlink.Sealed(c) && !s.unsealed
			if ms := s.Metas[h.Dir]; ms != nil {
				m := ms.Get()
				w.Gen, w.SyncTime, w.State = m.Gen, m.SyncTime, m.welcomeState()
			}
			return w
		}
		return wire.Welcome{}
	})
	s.release(from)
	if err != nil {
		// The error holds at most an excerpt of what the peer sent.
		if ok, held := s.failedLog.allow(time.Now(), handshakeLogEvery); ok {
			s.Log.Warn("peer handshake failed", "remote", c.RemoteAddr().String(), "err", err, "failed_unlogged", held)
		}
		return
	}
	if refuse != "" {
		s.refusePeer(c, refuse)
		return
	}
	c.SetDeadline(time.Time{})
	d, _ := s.dir(dirName)
	switch h.Purpose {
	case wire.PurposeManifest:
		if err := s.serveManifest(c, d); err != nil {
			s.Log.Warn("serving manifest", "dir", d.Name, "err", err)
		}
	case wire.PurposeReplicate:
		s.replicate(ctx, c, d, h, told)
	}
}

// rateLog lets one report through per interval and counts those it holds
// back, for the next report to say how many it stands for.
type rateLog struct {
	mu   sync.Mutex
	last time.Time // of the last report let through
	held int       // reports held back since
}

// allow reports whether a report at now goes out, and how many were held
// back before it.
func (r *rateLog) allow(now time.Time, every time.Duration) (ok bool, held int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.last.IsZero() && now.Sub(r.last) < every {
		r.held++
		return false, 0
	}
	held, r.held, r.last = r.held, 0, now
	return true, held
}

// notReplica refuses replication on a node that serves or stops.
const notReplica = "this node is not a replica now (it serves, or duet is stopped): it does not accept replication"

// refusePeer turns a connection away before it does anything.
func (s *Server) refusePeer(c net.Conn, reason string) {
	s.Log.Warn("refusing peer", "remote", c.RemoteAddr().String(), "reason", reason)
	wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(reason)})
}

// serveManifest answers manifest requests until the peer hangs up.
func (s *Server) serveManifest(c net.Conn, d Dir) error {
	for {
		f, err := wire.ReadFrame(c, nil)
		if err != nil {
			return nil
		}
		if f.Type != wire.TypeManifestQ {
			return fmt.Errorf("unexpected %s on a manifest connection", f.Type)
		}
		q, err := wire.DecodeManifestQuery(f.Payload)
		if err != nil {
			return err
		}
		q.Gen = 0 // a one-shot manifest never starts a resync
		if err := s.sendManifest(c, d, f.Seq, q); err != nil {
			return err
		}
	}
}

// manifestFrame is the size of entries past which a manifest frame is
// sent: a frame holds at most one entry more (wire.MaxManifestEntries).
// Small enough that the requester gets to work (it sums its copies of the
// files listed) while this side still scans: a few thousand entries.
const manifestFrame = 256 << 10

// sendManifest scans d and streams it as it goes, answering seq: with
// checksums of the files q asks for. Only one frame's entries are held:
// the requester compares (and sums its own files) while this side reads.
func (s *Server) sendManifest(c net.Conn, d Dir, seq uint64, q wire.ManifestQuery) error {
	root, err := fstree.OpenRoot(d.Path)
	if err != nil {
		return err
	}
	defer root.Close()
	w := bufio.NewWriterSize(c, 1<<20)
	var raw []byte
	flush := func() error {
		if len(raw) == 0 {
			return nil
		}
		err := wire.WriteFrame(w, &wire.Frame{Type: wire.TypeManifest, Flags: wire.FlagZstd, Seq: seq, Payload: wire.Compress(nil, raw)})
		raw = raw[:0]
		if err != nil {
			return err
		}
		// Sent now, not when the buffer fills: compressed frames are small,
		// and a buffer of them would hold back the requester's work (and
		// duet verify's progress) until the scan is nearly over.
		return w.Flush()
	}
	// The first frame goes as soon as it names an entry besides the root:
	// the requester of a full comparison waits for it to tell an empty
	// copy (which it sends its tree as it reads it) from one to compare,
	// before it scans its own.
	first := true
	start := time.Now()
	var entries, summed int
	var sumBytes uint64
	tooLong, err := walkManifest(root, q, func(e *wire.Entry) error {
		entries++
		if e.Flags&wire.EntrySummed != 0 {
			summed++
			sumBytes += e.Size
		}
		raw = wire.AppendEntry(raw, e)
		if len(raw) > manifestFrame || first && e.Path != "." {
			first = false
			return flush()
		}
		return nil
	})
	if err == nil {
		err = flush()
	}
	if err != nil {
		// The requester may have part of the manifest: this ends it.
		wire.WriteFrame(w, &wire.Frame{Type: wire.TypeError, Seq: seq, Payload: []byte(err.Error())})
		w.Flush()
		return err
	}
	if tooLong > 0 {
		s.Log.Warn("entries left out of the manifest: their paths are longer than the wire takes (the peer's scan leaves them out too)",
			"dir", d.Name, "entries", tooLong, "limit", wire.MaxPath)
	}
	if err := wire.WriteFrame(w, &wire.Frame{Type: wire.TypeEnd, Seq: seq}); err != nil {
		return err
	}
	s.Log.Info("manifest sent", "dir", d.Name, "entries", entries, "files_summed", summed, "bytes_summed", sumBytes,
		"all", q.All, "wanted", len(q.Want), "took", time.Since(start).Round(time.Millisecond))
	return w.Flush()
}

// walkManifest calls fn with every entry of the tree under root as q asks
// for it: flagged recent since q's cutoff, with checksums where wanted.
// With q.MovedDirs (this copy was the source: it may have rotated a
// directory the primary never heard of), the regular files under a
// directory that may have been moved in the window (movedInWindow) are
// flagged too, as markRecent does on the primary: the walk lists a
// directory before what it holds. Without it (a replica that crashed), the directories its
// applier changed in the window are the primary's renames, which the
// primary's bitmap marks, and flagging them would sum their trees. The
// files are summed sumWorkers at a time (orderedSums); fn is called in the
// walk's order, from one goroutine, not the caller's.
func walkManifest(root *os.File, q wire.ManifestQuery, fn func(*wire.Entry) error) (tooLong int, err error) {
	want := make(map[string]uint8, len(q.Want)) // path: block shift
	for i, w := range q.Want {
		var s uint8
		if i < len(q.WantShift) {
			s = q.WantShift[i]
		}
		want[w] = s
	}
	recent, moved := map[string]bool{}, map[string]bool{}
	fine := fineShifts{left: fineSumBudget}
	sums := newOrderedSums(root, fn)
	tooLong, err = fstree.Walk(root, false, func(e *wire.Entry) error {
		if q.Cutoff != 0 && (e.Ctime >= q.Cutoff || e.Mtime >= q.Cutoff || e.Mode.IsRegular() && underDir(moved, e.Path)) {
			e.Flags |= wire.EntryRecent
		}
		if q.Cutoff != 0 && q.MovedDirs && e.Mode.IsDir() && e.Ctime >= q.Cutoff {
			recent[e.Path] = true
			if movedInWindow(e.Path, recent) {
				moved[e.Path] = true
			}
		}
		shift, wanted := want[e.Path]
		sum := e.Mode.IsRegular() && (q.All || e.Flags&wire.EntryRecent != 0 || wanted)
		if sum {
			// The requester's blocks (0, 64 KiB, for a file it did not
			// name), larger where this copy is so much bigger than the
			// requester's that its checksums would pass the budget (a
			// copy truncated there while this node was away): the
			// manifest and the requester's listing keep to it.
			e.Shift = fine.take(shift, e.Size)
		}
		return sums.add(e, sum)
	})
	if err != nil {
		sums.fail(err) // what is queued is not summed nor sent
	}
	if cerr := sums.close(); err == nil {
		err = cerr
	}
	return tooLong, err
}

// warmTree reads the metadata of the tree at dir (every directory and
// every entry's inode, as a manifest's walk does) in the background, and
// returns a function that ends it and waits for it. A replica connected
// in a new session walks its tree for the primary's manifest request,
// which comes only after the primary scanned its own tree: read
// meanwhile, the walk finds the inodes cached, and after a restart with
// a cold cache the two nodes read their trees at the same time, not one
// after the other (issue 18).
func warmTree(ctx context.Context, dir string) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		root, err := fstree.OpenRoot(dir)
		if err != nil {
			return
		}
		defer root.Close()
		fstree.Walk(root, false, func(*wire.Entry) error { return ctx.Err() })
	}()
	return func() {
		cancel()
		<-done
	}
}

// replicate applies batches in order, acknowledging each once it is on
// stable storage.
func (s *Server) replicate(ctx context.Context, c net.Conn, d Dir, h wire.Hello, told wire.Welcome) {
	st := s.Stats(d.Name)
	r, err := s.state(d.Name)
	if err != nil {
		return
	}
	// A newer connection from the primary replaces an older one: the old
	// one is dead (the primary reconnects only after losing it) but may
	// not know it yet, e.g. after a crash without a FIN.
	r.cmu.Lock()
	r.gen++
	gen := r.gen
	if r.active != nil {
		s.Log.Warn("new replication connection replaces the previous one", "dir", d.Name)
		r.active.Close()
	}
	r.cmu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	// Others may have waited for mu too: only the newest may apply, an
	// older one got past the handshake before it and is dead the same.
	r.cmu.Lock()
	newest := r.gen == gen
	if newest {
		r.active = c
	}
	r.cmu.Unlock()
	if !newest {
		s.Log.Warn("dropping a replication connection that a newer one replaced while it waited", "dir", d.Name, "peer", c.RemoteAddr().String())
		return
	}
	defer func() {
		r.cmu.Lock()
		if r.active == c {
			r.active = nil
		}
		r.cmu.Unlock()
	}()
	// The node may have stopped being a replica while this connection
	// waited: SetAccept(false) interrupts only the active one. Checked
	// once active, so that a SetAccept after the check interrupts it.
	if !s.accept.Load() {
		s.refusePeer(c, notReplica)
		return
	}
	// The welcome was read while the connection this one replaces could
	// still apply (progress moves on: the batches resent are skipped),
	// or forget its progress after a failed flush (distrust). The primary
	// resumes where the welcome said: behind this copy's progress now, it
	// would skip batches this copy lost and later hear them called
	// durable. It reconnects and hears the truth.
	if sess, applied := r.progress(); sess != told.Session || applied < told.Applied {
		s.Log.Warn("replication connection dropped: this copy's progress changed after its welcome; the primary reconnects",
			"dir", d.Name, "welcome_session", told.Session, "welcome_applied", told.Applied, "session", sess, "applied", applied)
		return
	}
	a, err := NewApplier(d.Path)
	if err != nil {
		s.Log.Error("opening replica", "dir", d.Name, "err", err)
		wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(err.Error())})
		return
	}
	defer a.Close()
	a.Warn = s.Log.With("dir", d.Name).Warn
	if s.syncfs != nil {
		a.syncfs = s.syncfs
	}
	// The background syncs' descriptor is opened now, before anything
	// of this connection is applied: Linux reports a writeback error to
	// every descriptor opened before it, but not to one opened after a
	// flush saw it. Opened by the background sync itself, after the
	// connection's own flush had failed, it flushed "successfully" and
	// acknowledged the lost pages durable (TestBackgroundSyncAfterFailedFlush).
	// Closed after the background syncs (deferred before bg.Wait).
	bgDir, err := os.Open(d.Path)
	if err != nil {
		s.Log.Error("opening replica", "dir", d.Name, "err", err)
		wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(err.Error())})
		return
	}
	defer bgDir.Close()
	st.Connected.Store(true)
	st.Peer.Store(c.RemoteAddr().String())
	defer st.Connected.Store(false)
	s.Log.Info("replication connected", "dir", d.Name, "peer", c.RemoteAddr().String(), "session", h.Session)
	ms := s.Metas[d.Name]
	var lastMeta time.Time
	// stopWarm ends the warming of the tree's metadata, if one runs.
	stopWarm := func() {}
	defer func() { stopWarm() }()
	if r.session != h.Session {
		r.setProgress(h.Session, 0)
		r.partial, r.ops = 0, 0
		// A new session: the primary resyncs, and unless it compares
		// every file it asks for this side's manifest only once its own
		// scan is done. The warming ends once the manifest is sent.
		stopWarm = warmTree(ctx, d.Path)
	}
	// Acks of background syncs are written from their goroutine: every
	// write to the connection goes through lc, one frame per Write.
	lc := &lockedConn{c: c}
	var bg sync.WaitGroup
	defer bg.Wait()
	var bgRunning atomic.Bool
	br := bufio.NewReaderSize(c, 1<<20)
	// Batches are applied and acknowledged as they come; they are made
	// durable when the primary asks (a sync frame: a barrier waits) and
	// when the connection ends. In between the kernel writes them back
	// as it does any dirty data (within vm.dirty_expire_centisecs), like
	// a DRBD secondary's writes that carry no flush. What an earlier
	// connection or daemon run applied may still be dirty too (a killed
	// daemon does not sync): the first sync covers it.
	unsynced := true
	r.broken.Store(false) // an earlier connection's (it distrusted the copy)
	// distrusted: the progress was forgotten (distrust) at once, not when
	// the connection ends: a daemon killed in between (while it flushes
	// again, or waits for a background sync) would leave the file saying
	// the old progress, and its restart would resume.
	distrusted := false
	distrustNow := func() {
		if !distrusted {
			distrusted = true
			s.distrust(r, ms, d)
		}
	}
	syncNow := func() error {
		if !unsynced {
			return nil
		}
		syncStart := time.Now()
		if err := a.Sync(); err != nil {
			r.broken.Store(true)
			distrustNow()
			return err
		}
		st.SyncNs.Add(int64(time.Since(syncStart)))
		s.Stages.Since(latency.Flush, syncStart)
		st.Syncs.Add(1)
		unsynced = false
		return nil
	}
	defer func() {
		// A background sync still running may yet fail: it is heard
		// before the copy's progress is kept or forgotten.
		bg.Wait()
		if r.broken.Load() {
			distrustNow()
		}
		if err := syncNow(); err != nil {
			s.Log.Error("syncing replica", "dir", d.Name, "err", err)
		}
	}()
	// Over TLS the primary may leave out the payloads' CRC (FlagSealed).
	read := wire.ReadFrame
	if peerlink.Sealed(c) && !s.unsealed {
		read = wire.ReadSealedFrame
	}
	// The frame after a large batch is read (decrypted, checked) and
	// decoded while this goroutine applies the batch: a TLS link's cost
	// runs beside the applying instead of before it.
	ahead := newFrameReader(br, read)
	firstBatch := true // see a.strict
	for ctx.Err() == nil {
		if r.broken.Load() {
			// A background sync failed: forget the progress before
			// anything else (the deferred function would, later).
			distrustNow()
			return
		}
		rf := ahead.next()
		f, ops, err := rf.f, rf.ops, rf.err
		if err == nil && !s.accept.Load() {
			// This node stopped being a replica while frames were read
			// ahead: none of them is applied.
			err = errNotAccepting
		}
		if err != nil && !s.accept.Load() {
			// Ended by this node (it stops, or serves): what it applied
			// goes to disk and the primary hears so.
			// Not after a background sync failed: nothing is durable.
			if err := syncNow(); err == nil && !r.broken.Load() {
				wire.WriteFrame(lc, &wire.Frame{Type: wire.TypeAck, Flags: wire.FlagDurable, Seq: r.applied})
			}
			s.Log.Info("replication ended by this node", "dir", d.Name, "applied", r.applied)
			return
		}
		if err != nil {
			s.Log.Info("replication disconnected", "dir", d.Name, "err", err)
			return
		}
		if f.Flags&wire.FlagSealed != 0 {
			s.sealed.Add(1)
		}
		switch f.Type {
		case wire.TypeManifestQ:
			q, err := wire.DecodeManifestQuery(f.Payload)
			if err != nil {
				s.refuse(lc, st, d, fmt.Errorf("manifest request: %w", err))
				return
			}
			if q.Gen != 0 && ms != nil {
				// A resync into this copy begins: until it completes
				// the copy is a mix of old and new.
				if err := ms.Update(func(m *Meta) { m.Consistent = false }); err != nil {
					s.refuse(lc, st, d, err)
					return
				}
			}
			lc.mu.Lock() // a manifest is many writes
			err = s.sendManifest(c, d, f.Seq, q)
			lc.mu.Unlock()
			stopWarm()
			if err != nil {
				s.Log.Warn("sending manifest", "dir", d.Name, "err", err)
				return
			}
			continue
		case wire.TypeSync:
			syncStart := time.Now()
			if f.Flags&wire.FlagLazy != 0 {
				// The primary's periodic sync: run beside the applying,
				// which a syncfs under load would hold up for a while.
				if !bgRunning.Swap(true) {
					seq := r.applied
					bg.Add(1)
					go func() {
						defer bg.Done()
						defer bgRunning.Store(false)
						if s.bgSync != nil {
							s.bgSync()
						}
						if err := unix.Syncfs(int(bgDir.Fd())); err != nil {
							// The progress is forgotten on disk before
							// anything is logged: a daemon killed while it
							// logs (a stalled journal) would restart from
							// the old progress, and, the error reported
							// once, its next flush would succeed without
							// the lost pages (TestDistrustPersistsBeforeItLogs).
							forgetErr := r.forget()
							// Nor may this copy take over until a resync
							// ends (distrust, later, does it too).
							var metaErr error
							if ms != nil {
								metaErr = ms.Update(func(m *Meta) { m.Consistent = false })
							}
							s.Log.Error("background sync of the replica failed: this copy will be compared in full", "dir", d.Name, "err", err)
							if forgetErr != nil {
								s.Log.Error("the replica state still holds the progress from before the failed flush: remove it before restarting duet", "dir", d.Name, "err", forgetErr)
							}
							if metaErr != nil {
								s.Log.Error("marking the copy inconsistent", "dir", d.Name, "err", metaErr)
							}
							c.Close()
							return
						}
						if r.broken.Load() {
							return // a flush of the connection failed: nothing is durable
						}
						if ms != nil {
							ms.Update(func(m *Meta) {
								if m.Consistent && !m.Source {
									m.SyncTime, m.SyncSeq = inReckoning(syncStart), seq
								}
							})
						}
						wire.WriteFrame(lc, &wire.Frame{Type: wire.TypeAck, Flags: wire.FlagDurable, Seq: seq})
					}()
				}
				continue
			}
			if f.Flags&wire.FlagResyncDone != 0 {
				unsynced = true // the meta below must follow every batch to disk
				if f.Seq > r.applied {
					// The batches numbered between were dropped by the
					// source with a lost session, and this resync stands
					// for them: none is sent after its end. The end is
					// acknowledged with its own number, which the source
					// waits for, and a later connection resumes after it.
					r.setProgress(r.session, f.Seq)
					if err := r.save(); err != nil {
						r.unsave()
						s.refuse(lc, st, d, fmt.Errorf("saving replica state: %w", err))
						return
					}
					st.Applied.Store(f.Seq)
				}
			}
			if err := syncNow(); err != nil {
				s.refuse(lc, st, d, err)
				return
			}
			if r.broken.Load() {
				// A background sync failed: nothing is durable, and a
				// resync's end must not mark the copy consistent.
				s.refuse(lc, st, d, errFlushFailed)
				return
			}
			flags := wire.FlagDurable
			if f.Flags&wire.FlagResyncDone != 0 {
				if err := s.resyncDone(d, ms, f, syncStart, c.RemoteAddr().String()); err != nil {
					s.refuse(lc, st, d, err)
					return
				}
				flags |= wire.FlagResyncDone
			} else if ms != nil && time.Since(lastMeta) > metaEvery {
				// The sync point moves on; written now and then: an
				// older one only widens the next comparison.
				lastMeta = time.Now()
				ms.Update(func(m *Meta) {
					if m.Consistent && !m.Source {
						m.SyncTime, m.SyncSeq = inReckoning(syncStart), r.applied
					}
				})
			}
			if err := wire.WriteFrame(lc, &wire.Frame{Type: wire.TypeAck, Flags: flags, Seq: r.applied}); err != nil {
				return
			}
			continue
		case wire.TypeBatch:
		default:
			s.Log.Warn("unexpected frame on replication connection", "type", f.Type.String())
			return
		}
		if f.Seq <= r.applied {
			wire.WriteFrame(lc, &wire.Frame{Type: wire.TypeAck, Seq: r.applied})
			continue // already applied before a reconnect
		}
		if rf.decodeErr != nil {
			s.refuseBatch(lc, st, d, f.Seq, fmt.Errorf("batch %d: %w", f.Seq, rf.decodeErr))
			return
		}
		applyStart := time.Now()
		debugOps := s.Log.Enabled(context.Background(), slog.LevelDebug)
		skip := uint32(0)
		if r.partial == f.Seq {
			skip = r.ops
		}
		// The ops count goes with its batch: one left from another batch
		// (stopped, never resent: the primary resynced in this session)
		// would skip that many ops of this one if it stops before its
		// first save and is resent.
		r.partial, r.ops = f.Seq, skip
		var prog opProgress
		// saveAt records n ops of this batch applied, at op i.
		saveAt := func(i, n int) bool {
			r.ops = uint32(n)
			if err := r.save(); err != nil {
				r.unsave()
				s.refuse(lc, st, d, fmt.Errorf("batch %d op %d: saving replica state: %w", f.Seq, i, err))
				return false
			}
			return true
		}
		for i := range ops {
			if uint32(i) < skip {
				continue
			}
			// Only the first op applied of the first batch a
			// connection applies can be one applied before (a daemon
			// killed between it and the save that follows it: see
			// opProgress); any other is applied here for the first time.
			a.strict = !firstBatch || uint32(i) != skip
			if debugOps {
				s.Log.Debug("applying", "dir", d.Name, "batch", f.Seq, "op", i, "code", ops[i].Code, "path", ops[i].Path, "path2", ops[i].Path2, "off", ops[i].Off, "len", len(ops[i].Data))
			}
			if prog.before(ops[i].Code) && !saveAt(i, i) {
				return
			}
			if err := a.Apply(&ops[i]); err != nil {
				s.refuseBatch(lc, st, d, f.Seq, fmt.Errorf("batch %d op %d: %w", f.Seq, i, err))
				return
			}
			// After the batch's last op, the batch's own save follows.
			if prog.after(ops[i].Code) && i < len(ops)-1 && !saveAt(i, i+1) {
				return
			}
		}
		firstBatch = false
		st.ApplyNs.Add(int64(time.Since(applyStart)))
		s.Stages.Since(latency.Apply, applyStart)
		unsynced = true
		r.setProgress(r.session, f.Seq)
		r.partial, r.ops = 0, 0
		// Not fsynced: the state only serves a reconnect of this boot
		// (after a reboot it is discarded for a full comparison), and the
		// page cache keeps it across a crash of the daemon. One fsync
		// less on every barrier's path.
		if err := r.save(); err != nil {
			r.unsave()
			s.refuse(lc, st, d, fmt.Errorf("saving replica state: %w", err))
			return
		}
		st.Batches.Add(1)
		st.Ops.Add(uint64(len(ops)))
		st.Applied.Store(f.Seq)
		st.LastUpdate.Store(time.Now().UnixNano())
		if err := wire.WriteFrame(lc, &wire.Frame{Type: wire.TypeAck, Seq: f.Seq}); err != nil {
			return
		}
	}
}

// replayUnsafe says whether an op must not be applied twice among
// others: a namespace op changes what the paths of the ops around it name
// (a rename, then a create of the old name: applied again, the rename
// would move the new file over the old one's new name; a truncate, then a
// rename over its path: applied again, the truncate would cut the file
// renamed in). A write, truncate, punch or setattr sets bytes, a size or
// attributes of the file its path names: a run of them with no namespace
// op between leaves the same result when a reconnect applies it again.
func replayUnsafe(c wire.OpCode) bool {
	switch c {
	case wire.OpWrite, wire.OpTruncate, wire.OpPunch, wire.OpSetattr:
		return false
	}
	return true
}

// opProgress says when the replica saves how far into a batch it got, so
// that a daemon killed at any point (also between an op and the save that
// follows it) replays, when the batch comes again, either a run of writes,
// truncates, punches and setattrs, or one namespace op alone: each is
// safe to apply twice (TestReplayFromSavedOp). A durability call's batch
// (a truncate, a write, a setattr) costs no save but the batch's own.
type opProgress struct {
	unsaved bool // replayable ops applied since the last save
}

// before says whether to save, as i ops applied, before applying op i.
func (p *opProgress) before(c wire.OpCode) bool {
	if replayUnsafe(c) && p.unsaved {
		p.unsaved = false
		return true
	}
	return false
}

// after says whether to save, as i+1 ops applied, once op i is applied.
func (p *opProgress) after(c wire.OpCode) bool {
	if replayUnsafe(c) {
		p.unsaved = false
		return true
	}
	p.unsaved = true
	return false
}

// distrust forgets this copy's progress after a failed flush: the next
// connection is a new session (the primary compares the trees again
// instead of resuming after batches whose pages may be lost), and the copy
// counts as inconsistent (it does not take over) until that resync ends.
// The caller holds r.mu.
func (s *Server) distrust(r *replicaState, ms *MetaStore, d Dir) {
	// Everything is on disk before anything is logged (see the background
	// sync's failure): logging can stall, and a kill then must not leave
	// the old progress (TestDistrustPersistsBeforeItLogs).
	r.setProgress(0, 0)
	r.partial, r.ops = 0, 0
	storeErr := r.store(true)
	var emptyErr error
	if storeErr != nil {
		// The file must not keep the old progress: a restart would
		// resume from it. Emptied (no space needed) or removed, it reads
		// as no progress.
		r.fmu.Lock()
		emptyErr = r.empty()
		r.fmu.Unlock()
		// What a failed save later puts back (unsave) is no progress,
		// not the one from before the flush failed.
		r.filed.session, r.filed.applied, r.filed.partial, r.filed.ops = 0, 0, 0, 0
	}
	var metaErr error
	if ms != nil {
		metaErr = ms.Update(func(m *Meta) { m.Consistent = false })
	}
	s.Log.Error("a flush of the replica failed: its progress is forgotten and the next connection resyncs it", "dir", d.Name)
	if storeErr != nil {
		s.Log.Error("saving replica state", "dir", d.Name, "err", storeErr)
	}
	if emptyErr != nil {
		s.Log.Error("the replica state still holds the progress from before the failed flush: remove it before restarting duet", "dir", d.Name, "err", emptyErr)
	}
	if metaErr != nil {
		s.Log.Error("marking the copy inconsistent", "dir", d.Name, "err", metaErr)
	}
}

// errNotAccepting ends a replication connection whose next frame came
// after this node stopped being a replica.
var errNotAccepting = errors.New("this node is no longer a replica")

// aheadMin is the smallest frame (its payload as sent, compressed or not)
// whose applying the reading of the next frame runs beside. Below it the
// next frame is read after, in the same goroutine: handing a frame
// between goroutines costs more than a small batch's applying (tens of µs
// on a synchronous write's path); a large batch's applying and the next
// frame's reading (decrypting, checking, decompressing) are both costly.
const aheadMin = 64 << 10

// aheadSlot holds one frame: its buffer, and its batch's decompressed
// payload, which the batch's ops point into.
type aheadSlot struct {
	buf, scratch []byte
}

// aheadFrame is a frame read, its batch decoded; err is the read's.
type aheadFrame struct {
	f         wire.Frame
	ops       []wire.Op
	decodeErr error
	err       error
}

// frameReader reads a replication connection's frames in order, the next
// one beside the applying of a large one (see aheadMin). Two slots: the
// frame last returned, whose payload and ops stay valid until the next
// call, and the one read into.
type frameReader struct {
	br      *bufio.Reader
	read    func(io.Reader, []byte) (wire.Frame, error)
	slots   [2]aheadSlot
	cur     int             // the slot of the frame last returned
	pending chan aheadFrame // a read in progress into the other slot, or nil
}

func newFrameReader(br *bufio.Reader, read func(io.Reader, []byte) (wire.Frame, error)) *frameReader {
	return &frameReader{br: br, read: read}
}

// readInto reads the next frame into sl and decodes its batch.
func (fr *frameReader) readInto(sl *aheadSlot) aheadFrame {
	f, err := fr.read(fr.br, sl.buf)
	a := aheadFrame{f: f, err: err}
	if err != nil {
		return a
	}
	sl.buf = f.Payload[:0]
	if f.Type != wire.TypeBatch {
		return a
	}
	p, err := wire.Payload(&f, sl.scratch)
	if err != nil {
		a.decodeErr = err
		return a
	}
	if f.Flags&wire.FlagZstd != 0 {
		// Keep the decompression buffer. An uncompressed payload is the
		// frame buffer itself: decompressing the slot's next frame into
		// it would overwrite that frame's input as it decodes.
		sl.scratch = p[:0]
	}
	a.ops, a.decodeErr = wire.DecodeOps(p)
	return a
}

// next returns the next frame, with its batch's ops and their decoding's
// error, or the read's error. What it returned before (payload, ops) is
// no longer valid. A large frame's successor is read meanwhile.
func (fr *frameReader) next() aheadFrame {
	var a aheadFrame
	if fr.pending != nil {
		a = <-fr.pending
		fr.pending = nil
	} else {
		a = fr.readInto(&fr.slots[1-fr.cur])
	}
	fr.cur = 1 - fr.cur
	if a.err == nil && a.f.Type == wire.TypeBatch && len(a.f.Payload) >= aheadMin {
		// Read on while the caller applies this one. The goroutine ends
		// with its read: at the latest when the connection is closed.
		fr.pending = make(chan aheadFrame, 1)
		go func(sl *aheadSlot, done chan<- aheadFrame) { done <- fr.readInto(sl) }(&fr.slots[1-fr.cur], fr.pending)
	}
	return a
}

// lockedConn serialises writes to a replication connection: each Write
// (one frame) is whole; mu is held around messages of several writes.
type lockedConn struct {
	mu sync.Mutex
	c  net.Conn
}

func (l *lockedConn) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.c.Write(b)
}

// metaEvery spaces the replica's sync point updates.
const metaEvery = 4 * time.Second

// resyncDone records that the copy now follows the source's generation
// (every batch of the resync is on disk), and keeps the source's report of
// what the resync discarded from this copy.
func (s *Server) resyncDone(d Dir, ms *MetaStore, f wire.Frame, syncStart time.Time, peer string) error {
	done, err := wire.DecodeResyncDone(f.Payload)
	if err != nil {
		return err
	}
	if len(done.Report) > 0 {
		name := filepath.Join(s.StateDir, fmt.Sprintf("discarded-%s-%s.txt", d.Name, time.Now().UTC().Format("20060102T150405Z")))
		head := fmt.Sprintf("# duet: changes of this node's copy of %q (%s) discarded by the resync from %s at %s.\n"+
			"# This node held them, its peer never received them (it was the primary and failed or was cut off);\n"+
			"# the peer's copy won. One line per entry: path, TAB, what was discarded.\n",
			d.Name, d.Path, peer, time.Now().UTC().Format(time.RFC3339))
		if err := writeFileSync(name, append([]byte(head), done.Report...)); err != nil {
			return err
		}
		s.Log.Warn("resync discarded changes this node's copy held: see the report", "dir", d.Name,
			"entries", bytes.Count(done.Report, []byte("\n")), "report", name)
	}
	if ms == nil {
		return nil
	}
	return ms.Update(func(m *Meta) {
		m.Gen, m.Consistent, m.Source, m.Crashed = done.Gen, true, false, false
		m.Untracked = 0 // a mirror of the source's generation: nothing of its own
		m.SyncTime, m.SyncSeq = inReckoning(syncStart), f.Seq
	})
}

// refuse reports an apply failure to the operator and the primary. Nothing
// after the failed op is applied; the primary keeps the batch.
func (s *Server) refuse(c io.Writer, st *ServerStats, d Dir, err error) {
	s.refuseBatch(c, st, d, 0, err)
}

// refuseBatch is refuse for batch seq, flagged wire.FlagDiverged when the
// error says this copy's tree is not what the batch expects.
func (s *Server) refuseBatch(c io.Writer, st *ServerStats, d Dir, seq uint64, err error) {
	st.LastError.Store(err.Error())
	s.Log.Error("cannot apply replication batch", "dir", d.Name, "err", err)
	var flags uint16
	if seq != 0 && diverged(err) {
		flags = wire.FlagDiverged
	}
	wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Flags: flags, Seq: seq, Payload: []byte(err.Error())})
}

// diverged says whether an apply error tells that the replica's tree
// differs from the primary's (a name missing or held by another kind of
// node, a batch that does not decode), which sending the batch again
// would not change; not a lack of space, a read-only or failing disk or
// a permission, which may pass, nor an entry changed under the op by a
// local change (errReplaced) or an owner this system cannot map
// (EINVAL), which a comparison of every file would not mend either.
func diverged(err error) bool {
	for _, e := range []error{unix.ENOENT, unix.ENOTDIR, unix.EISDIR, unix.EEXIST, unix.ENOTEMPTY, unix.ELOOP, errAncestor, wire.ErrBadOp} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
