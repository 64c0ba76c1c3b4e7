package replica

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
)

// Dir is one replicated directory as a node knows it.
type Dir struct {
	Name string // the same on both nodes
	Path string // local path
}

// Server accepts peer connections: batches for replicas (when this node is
// the secondary) and manifest requests (either role, for verify).
type Server struct {
	Key      []byte
	StateDir string
	Dirs     []Dir
	Log      *slog.Logger
	accept   atomic.Bool // replicas take batches; a serving node does not

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
	mu      sync.Mutex // one replication connection at a time
	cmu     sync.Mutex
	active  net.Conn // the connection holding mu
	file    *os.File
	session uint64
	applied uint64
	partial uint64 // batch applied[+1] ...
	ops     uint32 // ... up to this many ops
	boot    [16]byte
}

const stateSize = 8 + 8 + 8 + 4 + 16 + 4

func bootID() [16]byte {
	var id [16]byte
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err == nil {
		copy(id[:], bytes.ReplaceAll(bytes.TrimSpace(b), []byte("-"), nil))
	}
	return id
}

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
	buf := make([]byte, stateSize)
	if n, _ := f.ReadAt(buf, 0); n == stateSize &&
		crc32.Checksum(buf[:stateSize-4], castagnoli) == binary.LittleEndian.Uint32(buf[stateSize-4:]) {
		le := binary.LittleEndian
		r.session, r.applied, r.partial, r.ops = le.Uint64(buf), le.Uint64(buf[8:]), le.Uint64(buf[16:]), le.Uint32(buf[24:])
		copy(r.boot[:], buf[28:44])
		// After a reboot the page cache is gone and with it any order
		// between applied ops: only a full comparison is safe.
		if r.boot != bootID() {
			r.session, r.applied, r.partial, r.ops = 0, 0, 0, 0
		}
	}
	s.replicas[name] = r
	return r, nil
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// save records progress. It is a pwrite into the page cache, ordered before
// the batch's syncfs when the state lives on the replica's filesystem.
func (r *replicaState) save() error {
	buf := make([]byte, stateSize)
	le := binary.LittleEndian
	le.PutUint64(buf, r.session)
	le.PutUint64(buf[8:], r.applied)
	le.PutUint64(buf[16:], r.partial)
	le.PutUint32(buf[24:], r.ops)
	r.boot = bootID()
	copy(buf[28:44], r.boot[:])
	le.PutUint32(buf[stateSize-4:], crc32.Checksum(buf[:stateSize-4], castagnoli))
	_, err := r.file.WriteAt(buf, 0)
	return err
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
// serves): off also closes the replication connections in progress.
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
			r.active.Close()
		}
		r.cmu.Unlock()
	}
}

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
		go s.handle(ctx, c)
	}
}

func (s *Server) handle(ctx context.Context, c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var dirName string
	var refuse string
	h, err := wire.ServerHandshake(c, s.Key, func(h wire.Hello) wire.Welcome {
		dirName = h.Dir
		if _, ok := s.dir(h.Dir); !ok {
			refuse = fmt.Sprintf("no replicated directory named %q on this node", h.Dir)
			return wire.Welcome{}
		}
		if h.Purpose == wire.PurposeReplicate {
			if !s.accept.Load() {
				refuse = "this node is not a replica now (it serves, or duet is stopped): it does not accept replication"
				return wire.Welcome{}
			}
			r, err := s.state(h.Dir)
			if err != nil {
				refuse = err.Error()
				return wire.Welcome{}
			}
			return wire.Welcome{Session: r.session, Applied: r.applied}
		}
		return wire.Welcome{}
	})
	if err != nil {
		s.Log.Warn("peer handshake failed", "remote", c.RemoteAddr().String(), "err", err)
		return
	}
	if refuse != "" {
		s.Log.Warn("refusing peer", "remote", c.RemoteAddr().String(), "reason", refuse)
		wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(refuse)})
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
		s.replicate(ctx, c, d, h)
	}
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
		if err := sendManifest(c, d.Path, f.Seq); err != nil {
			return err
		}
	}
}

// sendManifest scans dir with checksums and streams it, answering seq.
func sendManifest(c net.Conn, dir string, seq uint64) error {
	root, err := fstree.OpenRoot(dir)
	if err != nil {
		return err
	}
	defer root.Close()
	entries, err := fstree.Scan(root, true)
	if err != nil {
		wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Seq: seq, Payload: []byte(err.Error())})
		return err
	}
	w := bufio.NewWriterSize(c, 1<<20)
	var raw []byte
	flush := func() error {
		if len(raw) == 0 {
			return nil
		}
		err := wire.WriteFrame(w, &wire.Frame{Type: wire.TypeManifest, Flags: wire.FlagZstd, Seq: seq, Payload: wire.Compress(nil, raw)})
		raw = raw[:0]
		return err
	}
	for i := range entries {
		raw = wire.AppendEntry(raw, &entries[i])
		if len(raw) > 4<<20 {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	if err := wire.WriteFrame(w, &wire.Frame{Type: wire.TypeEnd, Seq: seq}); err != nil {
		return err
	}
	return w.Flush()
}

// replicate applies batches in order, acknowledging each once it is on
// stable storage.
func (s *Server) replicate(ctx context.Context, c net.Conn, d Dir, h wire.Hello) {
	st := s.Stats(d.Name)
	r, err := s.state(d.Name)
	if err != nil {
		return
	}
	// A newer connection from the primary replaces an older one: the old
	// one is dead (the primary reconnects only after losing it) but may
	// not know it yet, e.g. after a crash without a FIN.
	r.cmu.Lock()
	if r.active != nil {
		s.Log.Warn("new replication connection replaces the previous one", "dir", d.Name)
		r.active.Close()
	}
	r.cmu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cmu.Lock()
	r.active = c
	r.cmu.Unlock()
	defer func() {
		r.cmu.Lock()
		if r.active == c {
			r.active = nil
		}
		r.cmu.Unlock()
	}()
	a, err := NewApplier(d.Path)
	if err != nil {
		s.Log.Error("opening replica", "dir", d.Name, "err", err)
		wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(err.Error())})
		return
	}
	defer a.Close()
	st.Connected.Store(true)
	st.Peer.Store(c.RemoteAddr().String())
	defer st.Connected.Store(false)
	s.Log.Info("replication connected", "dir", d.Name, "peer", c.RemoteAddr().String(), "session", h.Session)
	if r.session != h.Session {
		r.session, r.applied, r.partial, r.ops = h.Session, 0, 0, 0
	}
	br := bufio.NewReaderSize(c, 1<<20)
	var buf, scratch []byte
	// Batches are applied and acknowledged as they come; they are made
	// durable when the primary asks (a sync frame: a barrier waits) and
	// when the connection ends. In between the kernel writes them back
	// as it does any dirty data (within vm.dirty_expire_centisecs), like
	// a DRBD secondary's writes that carry no flush.
	unsynced := false
	sync := func() error {
		if !unsynced {
			return nil
		}
		syncStart := time.Now()
		if err := a.Sync(); err != nil {
			return err
		}
		st.SyncNs.Add(int64(time.Since(syncStart)))
		st.Syncs.Add(1)
		unsynced = false
		return nil
	}
	defer func() {
		if err := sync(); err != nil {
			s.Log.Error("syncing replica", "dir", d.Name, "err", err)
		}
	}()
	for ctx.Err() == nil {
		f, err := wire.ReadFrame(br, buf)
		if err != nil {
			s.Log.Info("replication disconnected", "dir", d.Name, "err", err)
			return
		}
		buf = f.Payload[:0]
		switch f.Type {
		case wire.TypeManifestQ:
			if err := sendManifest(c, d.Path, f.Seq); err != nil {
				s.Log.Warn("sending manifest", "dir", d.Name, "err", err)
				return
			}
			continue
		case wire.TypeSync:
			if err := sync(); err != nil {
				s.refuse(c, st, d, err)
				return
			}
			if err := wire.WriteFrame(c, &wire.Frame{Type: wire.TypeAck, Flags: wire.FlagDurable, Seq: r.applied}); err != nil {
				return
			}
			continue
		case wire.TypeBatch:
		default:
			s.Log.Warn("unexpected frame on replication connection", "type", f.Type.String())
			return
		}
		if f.Seq <= r.applied {
			wire.WriteFrame(c, &wire.Frame{Type: wire.TypeAck, Seq: r.applied})
			continue // already applied before a reconnect
		}
		p, err := wire.Payload(&f, scratch)
		if err != nil {
			s.refuse(c, st, d, fmt.Errorf("batch %d: %w", f.Seq, err))
			return
		}
		if f.Flags&wire.FlagZstd != 0 {
			// Keep the decompression buffer. An uncompressed payload is
			// the frame buffer itself: decompressing the next frame
			// into it would overwrite that frame's input as it decodes.
			scratch = p[:0]
		}
		ops, err := wire.DecodeOps(p)
		if err != nil {
			s.refuse(c, st, d, fmt.Errorf("batch %d: %w", f.Seq, err))
			return
		}
		applyStart := time.Now()
		skip := uint32(0)
		if r.partial == f.Seq {
			skip = r.ops
		}
		r.partial = f.Seq
		for i := range ops {
			if uint32(i) < skip {
				continue
			}
			if err := a.Apply(&ops[i]); err != nil {
				s.refuse(c, st, d, fmt.Errorf("batch %d op %d: %w", f.Seq, i, err))
				return
			}
			if ops[i].Code != wire.OpWrite {
				r.ops = uint32(i + 1)
				r.save()
			}
		}
		st.ApplyNs.Add(int64(time.Since(applyStart)))
		unsynced = true
		r.applied, r.partial, r.ops = f.Seq, 0, 0
		// Not fsynced: the state only serves a reconnect of this boot
		// (after a reboot it is discarded for a full comparison), and the
		// page cache keeps it across a crash of the daemon. One fsync
		// less on every barrier's path.
		if err := r.save(); err != nil {
			s.refuse(c, st, d, fmt.Errorf("saving replica state: %w", err))
			return
		}
		st.Batches.Add(1)
		st.Ops.Add(uint64(len(ops)))
		st.Applied.Store(f.Seq)
		st.LastUpdate.Store(time.Now().UnixNano())
		if err := wire.WriteFrame(c, &wire.Frame{Type: wire.TypeAck, Seq: f.Seq}); err != nil {
			return
		}
	}
}

// refuse reports an apply failure to the operator and the primary. Nothing
// after the failed op is applied; the primary keeps the batch.
func (s *Server) refuse(c net.Conn, st *ServerStats, d Dir, err error) {
	st.LastError.Store(err.Error())
	s.Log.Error("cannot apply replication batch", "dir", d.Name, "err", err)
	wire.WriteFrame(c, &wire.Frame{Type: wire.TypeError, Payload: []byte(err.Error())})
}
