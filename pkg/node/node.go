// Package node runs a duet daemon: capture and shipping on the primary,
// applying on the secondary, manifests for verify on both, and the control
// socket that `duet status` reads.
package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/replica"
)

// Version is set at build time.
var Version = "dev"

// Status is what `duet status` shows.
type Status struct {
	Node      string               `json:"node"`
	Role      string               `json:"role"`
	Version   string               `json:"version"`
	Listen    string               `json:"listen"`
	Peer      string               `json:"peer"`
	Hooks     []capture.HookStatus `json:"hooks,omitempty"`
	Capture   *capture.Counters    `json:"capture,omitempty"`
	RingBytes int                  `json:"ring_buffered_bytes"`
	Dirs      []replica.Status     `json:"dirs,omitempty"`
	Replicas  []ReplicaStatus      `json:"replicas,omitempty"`
	InSync    bool                 `json:"in_sync"`
}

// ReplicaStatus is a secondary directory's state.
type ReplicaStatus struct {
	Dir        string  `json:"dir"`
	Path       string  `json:"path"`
	Connected  bool    `json:"connected"`
	Peer       string  `json:"peer,omitempty"`
	Batches    uint64  `json:"batches_applied"`
	Ops        uint64  `json:"ops_applied"`
	LastSeq    uint64  `json:"last_seq"`
	LastUpdate string  `json:"last_update,omitempty"`
	LastError  string  `json:"last_error,omitempty"`
	ApplyAvgMs float64 `json:"apply_avg_ms"`
	SyncAvgMs  float64 `json:"sync_avg_ms"`
}

// ext4Magic is EXT4_SUPER_MAGIC (statfs f_type).
const ext4Magic = 0xEF53

// Node is a running daemon.
type Node struct {
	dispatched atomic.Uint64 // records handed to the primaries
	cfg        *config.Config
	log        *slog.Logger
	key        []byte
	cap        *capture.Capture
	primaries  []*replica.Primary
	server     *replica.Server
}

// Run starts the daemon and blocks until ctx ends.
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	key, err := cfg.ReadKey()
	if err != nil {
		return err
	}
	n := &Node{cfg: cfg, log: log, key: key}
	var dirs []replica.Dir
	for _, r := range cfg.Replicate {
		dirs = append(dirs, replica.Dir{Name: r.Name, Path: r.Path})
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state_dir %q: %w", cfg.StateDir, err)
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %q: %w (is the address configured on this host, and the port free?)", cfg.Listen, err)
	}
	n.server = &replica.Server{Key: key, StateDir: cfg.StateDir, Dirs: dirs, Log: log,
		AcceptReplication: cfg.Role == config.RoleSecondary}
	ctl, err := n.listenControl()
	if err != nil {
		ln.Close()
		return err
	}
	defer ctl.Close()
	defer os.Remove(cfg.Socket)

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	if cfg.Role == config.RolePrimary {
		if err := n.startPrimary(ctx, &wg, dirs); err != nil {
			ln.Close()
			return err
		}
		defer n.cap.Close()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		if err := n.server.Serve(ctx, ln); err != nil {
			log.Error("peer listener failed", "err", err)
			cancel()
		}
	}()
	go func() {
		defer wg.Done()
		n.serveControl(ctx, ctl)
	}()
	log.Info("duet running", "node", cfg.Node, "role", cfg.Role, "listen", cfg.Listen, "peer", cfg.Peer, "version", Version)
	<-ctx.Done()
	ctl.Close()
	if n.cap != nil {
		n.cap.Close()
	}
	wg.Wait()
	for _, p := range n.primaries {
		p.Close()
	}
	log.Info("duet stopped", "node", cfg.Node)
	return nil
}

func (n *Node) startPrimary(ctx context.Context, wg *sync.WaitGroup, dirs []replica.Dir) error {
	var devs []uint64
	for i, d := range dirs {
		var st syscall.Stat_t
		if err := syscall.Stat(d.Path, &st); err != nil {
			return fmt.Errorf("replicate[%d].path %q: %w", i, d.Path, err)
		}
		var fs syscall.Statfs_t
		if err := syscall.Statfs(d.Path, &fs); err != nil {
			return fmt.Errorf("replicate[%d].path %q: %w", i, d.Path, err)
		}
		// Capture relies on ext4's write_end and inode tracepoints; on
		// another filesystem changes would be missed, so refuse to start.
		if fs.Type != ext4Magic {
			return fmt.Errorf("replicate[%d].path %q: filesystem type %#x is not supported: duet captures changes on ext4 only (see docs/CAPTURE.md)", i, d.Path, fs.Type)
		}
		devs = append(devs, st.Dev)
		p, err := replica.NewPrimary(d, n.cfg.Peer, n.key, capture.KernelDev(st.Dev), n.log)
		if err != nil {
			return err
		}
		n.primaries = append(n.primaries, p)
	}
	c, err := capture.Open(capture.Options{Devices: devs, RingBytes: uint32(n.cfg.RingBufferKiB) << 10})
	if err != nil {
		return fmt.Errorf("starting capture: %w", err)
	}
	n.cap = c
	var active []string
	for _, h := range c.Hooks() {
		if h.Active {
			active = append(active, h.Type+"/"+h.Name)
		} else {
			n.log.Warn("capture hook unavailable", "hook", h.Name, "err", h.Error)
		}
	}
	n.log.Info("capture attached", "hooks", strings.Join(active, ","))
	wg.Add(2 + len(n.primaries))
	go func() {
		defer wg.Done()
		n.dispatch()
	}()
	go func() {
		defer wg.Done()
		n.watchOverflow(ctx)
	}()
	for _, p := range n.primaries {
		go func() {
			defer wg.Done()
			p.Run(ctx, kernel{n})
		}()
	}
	return nil
}

// dispatch hands every capture record to the primaries of its device.
func (n *Node) dispatch() {
	var r capture.Record
	for {
		if err := n.cap.Read(&r); err != nil {
			if !errors.Is(err, os.ErrClosed) {
				n.log.Error("reading capture ring buffer", "err", err)
			}
			return
		}
		now := time.Now()
		for _, p := range n.primaries {
			if p.Dev == r.Dev {
				p.Record(&r, now)
			}
		}
		n.dispatched.Add(1)
	}
}

// kernel gives primaries the capture side: in-flight marks and the drain
// barrier.
type kernel struct{ n *Node }

func (k kernel) ForgetChunks(keys []capture.CaptureChunkKey) error { return k.n.cap.ForgetChunks(keys) }
func (k kernel) ForgetAttr(key capture.InodeKey)                   { k.n.cap.ForgetAttr(key) }

func (k kernel) Seq() uint64 {
	c, err := k.n.cap.Counters()
	if err != nil {
		return 0
	}
	return c.Seq
}

// Drain waits until every record reserved before the call was dispatched:
// the kernel's sequence counts successful reservations, each of which is
// submitted and read in turn. Bounded, in case the reader stopped.
func (k kernel) Drain() {
	target := k.Seq()
	if k.n.dispatched.Load() >= target {
		return
	}
	k.n.cap.Kick()
	deadline := time.Now().Add(time.Second)
	for k.n.dispatched.Load() < target && time.Now().Before(deadline) {
		time.Sleep(20 * time.Microsecond)
	}
}

// watchOverflow turns lost records into rescans: of the inodes the kernel
// marked, or of whole trees when even the marks overflowed.
func (n *Node) watchOverflow(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	var lost uint64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		ctr, err := n.cap.Counters()
		if err != nil || ctr.Lost == lost {
			continue
		}
		lost = ctr.Lost
		if ctr.Rescan > 0 {
			n.log.Warn("capture overflow: rescanning every replicated tree", "lost_records", ctr.Lost)
			n.cap.ResetRescan()
			for _, p := range n.primaries {
				p.RescanAll()
			}
		}
		keys, err := n.cap.TakeOverflow()
		if err != nil {
			continue
		}
		if len(keys) > 0 {
			n.log.Warn("capture overflow: rescanning files", "files", len(keys), "lost_records", ctr.Lost)
		}
		for _, k := range keys {
			for _, p := range n.primaries {
				if p.Dev == k.Dev {
					p.Rescan(k)
				}
			}
		}
	}
}

func (n *Node) listenControl() (net.Listener, error) {
	os.MkdirAll(filepath.Dir(n.cfg.Socket), 0o700)
	if c, err := net.Dial("unix", n.cfg.Socket); err == nil {
		c.Close()
		return nil, fmt.Errorf("socket %q: another duet daemon is running with it", n.cfg.Socket)
	}
	os.Remove(n.cfg.Socket)
	ln, err := net.Listen("unix", n.cfg.Socket)
	if err != nil {
		return nil, fmt.Errorf("socket %q: %w", n.cfg.Socket, err)
	}
	os.Chmod(n.cfg.Socket, 0o600)
	return ln, nil
}

func (n *Node) serveControl(ctx context.Context, ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			if err != nil {
				return
			}
			switch strings.TrimSpace(line) {
			case "status":
				json.NewEncoder(c).Encode(n.Status())
			case "barrier":
				c.SetDeadline(time.Time{})
				fmt.Fprintln(c, n.barrier(ctx))
			default:
				fmt.Fprintf(c, "{\"error\":%q}\n", "unknown request "+strings.TrimSpace(line))
			}
		}()
	}
}

// AloneAfter is how long a barrier waits for a missing peer before the
// node declares itself alone and releases durability calls.
const AloneAfter = 5 * time.Second

// barrierTimeout bounds a barrier with a connected peer; past it the call
// fails (EIO) rather than claim durability.
const barrierTimeout = 30 * time.Second

// barrier waits until everything captured so far is on the peer: "ok",
// "alone" (no peer: released, tracked for a resync), or "error: ...".
func (n *Node) barrier(ctx context.Context) string {
	if n.cfg.Role != config.RolePrimary {
		return "error: this node is not the primary"
	}
	ctx, cancel := context.WithTimeout(ctx, barrierTimeout)
	defer cancel()
	reply := "ok"
	for _, p := range n.primaries {
		err := p.WaitShipped(ctx, kernel{n}, AloneAfter)
		switch {
		case errors.Is(err, replica.ErrAlone):
			reply = "alone"
		case err != nil:
			return "error: " + err.Error()
		}
	}
	return reply
}

// Barrier asks the daemon behind socket to wait until every change is on
// the peer. nil means durable on the peer, or released because no peer
// is connected (alone).
func Barrier(socket string) error {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return fmt.Errorf("no duet daemon at %s: %w", socket, err)
	}
	defer c.Close()
	if _, err := c.Write([]byte("barrier\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("barrier: daemon gone: %w", err)
	}
	switch line = strings.TrimSpace(line); line {
	case "ok", "alone":
		return nil
	}
	return errors.New(line)
}

// Status collects the daemon's state.
func (n *Node) Status() Status {
	s := Status{Node: n.cfg.Node, Role: n.cfg.Role, Version: Version, Listen: n.cfg.Listen, Peer: n.cfg.Peer, InSync: true}
	if n.cap != nil {
		s.Hooks = n.cap.Hooks()
		if c, err := n.cap.Counters(); err == nil {
			s.Capture = &c
		}
		s.RingBytes = n.cap.Buffered()
		if s.RingBytes > 0 {
			s.InSync = false
		}
	}
	for _, p := range n.primaries {
		ps := p.Status()
		s.InSync = s.InSync && ps.InSync
		s.Dirs = append(s.Dirs, ps)
	}
	if n.cfg.Role == config.RoleSecondary {
		for _, d := range n.cfg.Replicate {
			st := n.server.Stats(d.Name)
			rs := ReplicaStatus{Dir: d.Name, Path: d.Path, Connected: st.Connected.Load(),
				Peer: st.Peer.Load().(string), Batches: st.Batches.Load(), Ops: st.Ops.Load(),
				LastSeq: st.Applied.Load(), LastError: st.LastError.Load().(string)}
			if b := st.Batches.Load(); b > 0 {
				rs.ApplyAvgMs = float64(st.ApplyNs.Load()) / float64(b) / 1e6
				rs.SyncAvgMs = float64(st.SyncNs.Load()) / float64(b) / 1e6
			}
			if t := st.LastUpdate.Load(); t != 0 {
				rs.LastUpdate = time.Unix(0, t).Format(time.RFC3339Nano)
			}
			s.InSync = s.InSync && rs.Connected
			s.Replicas = append(s.Replicas, rs)
		}
	}
	return s
}

// Query asks the daemon behind socket for its status.
func Query(socket string) (Status, error) {
	var s Status
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return s, fmt.Errorf("no duet daemon at %s: %w", socket, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("status\n")); err != nil {
		return s, err
	}
	if err := json.NewDecoder(c).Decode(&s); err != nil {
		return s, fmt.Errorf("reading status from %s: %w", socket, err)
	}
	return s, nil
}
