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
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/stack"
	"github.com/duet-ha/duet/pkg/vip"
	"golang.org/x/sys/unix"
)

// Version is set at build time.
var Version = "dev"

// Status is what `duet status` shows.
type Status struct {
	Node      string               `json:"node"`
	Role      string               `json:"role"` // configured preference
	State     string               `json:"state"`
	Epoch     uint64               `json:"epoch"`
	Stale     bool                 `json:"stale"`
	Version   string               `json:"version"`
	Listen    string               `json:"listen"`
	Peer      string               `json:"peer"`
	PeerState PeerStatus           `json:"peer_state"`
	VIP       *VIPStatus           `json:"vip,omitempty"`
	Services  []stack.Status       `json:"services,omitempty"`
	Hooks     []capture.HookStatus `json:"hooks,omitempty"`
	Capture   *capture.Counters    `json:"capture,omitempty"`
	RingBytes int                  `json:"ring_buffered_bytes"`
	LagMs     float64              `json:"lag_ms"`
	LagBytes  int                  `json:"lag_bytes"`
	// LagHistogram counts acknowledged batches by replication lag, and
	// BarrierHistogram durability calls by time waited, since start.
	LagHistogram     Histogram `json:"lag_histogram"`
	BarrierHistogram Histogram `json:"barrier_histogram"`
	// BarriersWaiting durability calls wait for the peer now, the
	// oldest for BarrierOldestWaitMs.
	BarriersWaiting     int              `json:"barriers_waiting"`
	BarrierOldestWaitMs float64          `json:"barrier_oldest_wait_ms"`
	Dirs                []replica.Status `json:"dirs,omitempty"`
	Replicas            []ReplicaStatus  `json:"replicas,omitempty"`
	// Copies is what this node knows of its copy of each directory.
	Copies []CopyStatus `json:"copies,omitempty"`
	InSync bool         `json:"in_sync"`
	// Latency counts the stages of durability calls since start
	// (duet status --latency).
	Latency []latency.StageCounts `json:"latency,omitempty"`
	// Module is the configured module; EventHook the last peer_lost,
	// peer_lost_check or peer_back command and how it went; LostPeer
	// where the hooks stand with a lost peer (not confirmed down yet,
	// or peer_lost run and peer_back owed).
	Module    string `json:"module,omitempty"`
	EventHook string `json:"event_hook,omitempty"`
	LostPeer  string `json:"lost_peer,omitempty"`
}

// CopyStatus is one directory's copy on this node (see replica.Meta).
type CopyStatus struct {
	Dir        string `json:"dir"`
	Gen        string `json:"gen"`
	Source     bool   `json:"source"`
	Consistent bool   `json:"consistent"`
	Crashed    bool   `json:"crashed"`
	SyncPoint  string `json:"sync_point,omitempty"`
	SyncSeq    uint64 `json:"sync_seq"`
	// FreeBytes and SizeBytes are the directory's filesystem's space
	// available to unprivileged writers and its size (0, 0: unknown). A
	// full disk stops writers on the primary and the applying on the
	// secondary; behind kine it loses acknowledged puts (README).
	FreeBytes uint64 `json:"free_bytes"`
	SizeBytes uint64 `json:"size_bytes"`
}

// PeerStatus is what the heartbeats say of the peer.
type PeerStatus struct {
	Seen          bool    `json:"seen"`
	Name          string  `json:"name,omitempty"`
	State         string  `json:"state,omitempty"`
	Epoch         uint64  `json:"epoch"`
	LastHeartbeat float64 `json:"last_heartbeat_ms_ago,omitempty"`
	Heartbeats    uint64  `json:"heartbeats_received"`
	Refused       uint64  `json:"heartbeats_refused"`
	Lost          uint64  `json:"times_lost"`
}

// VIPStatus says where the virtual IP is.
type VIPStatus struct {
	Address   string `json:"address"`
	Interface string `json:"interface"`
	Held      bool   `json:"held_here"`
	Error     string `json:"error,omitempty"`
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
	Syncs      uint64  `json:"syncs"`
	SyncAvgMs  float64 `json:"sync_avg_ms"`
}

// ext4Magic is EXT4_SUPER_MAGIC (statfs f_type).
const ext4Magic = 0xEF53

// Node is a running daemon.
type Node struct {
	dispatched atomic.Uint64        // records handed to the primaries
	metas      []*replica.MetaStore // per directory, as n.dirs
	// Drain waiters sleep on drained; dispatch wakes them while any wait.
	drainWaiters atomic.Int32
	// overflowMu serializes turning lost records into rescans (the 50 ms
	// watcher and every barrier); overflowSeen is the lost count handled.
	overflowMu     sync.Mutex
	overflowTo     atomic.Pointer[[]*replica.Primary] // n.primaries, read without smu (a barrier may hold it)
	overflowSeen   uint64
	overflowLogged time.Time
	drainMu        sync.Mutex
	drained        *sync.Cond
	// lastBarrier (unix ns) keeps the capture's eager wake-ups on while
	// durability calls come in; eager says they are on.
	lastBarrier atomic.Int64
	eager       atomic.Bool
	cfg         *config.Config
	log         *slog.Logger
	// keys are the cluster keys, the current one first (see
	// heartbeatKey); link, the TCP link to the peer made of them.
	keys    [][]byte
	peerKey atomic.Int32
	link    *peerlink.Link
	dirs    []replica.Dir
	devs    []uint64
	xfs     bool     // a replicated directory is on XFS: capture requires its hooks
	btrfs   []uint64 // the btrfs superblocks replicated directories are on
	server  *replica.Server
	vip     *vip.VIP
	stack   *stack.Stack
	metrics *metrics
	waiting waiting // durability calls in progress
	// barrierTimeout is how long a durability call waits for a peer
	// that confirms nothing before its connection is ended, and again
	// before the call fails (defaultBarrierTimeout; tests shorten it).
	barrierTimeout time.Duration

	// The serving side exists while the node is PRIM or ALONE.
	smu         sync.RWMutex
	cap         *capture.Capture
	primaries   []*replica.Primary
	serveCancel context.CancelFunc
	serveWG     sync.WaitGroup
	// startingCancel and startingDone: the services' start in progress
	// (startServices), ended by endServiceStart.
	startingCancel context.CancelFunc
	startingDone   chan struct{}
	next           *preloaded // capture for the next term
	// detaching: captures of ended terms whose hooks are being detached.
	detaching sync.WaitGroup
	// stopAnnounce ends the gratuitous ARPs of the current term.
	stopAnnounce func()
	// releasedAlone: a barrier was released without the peer, or waited
	// barrierTimeout for it (peerSilent); the peer counts as in sync only
	// once all of it has been shipped. aloneGen counts such events, and
	// catchingUp is set while a catch-up runs (see peerSynced).
	releasedAlone atomic.Bool
	aloneGen      atomic.Uint64
	catchingUp    atomic.Bool
	// silent holds the primaries (*replica.Primary) whose connection a
	// durability call ended because the peer confirmed nothing, until a
	// call is confirmed again: one end and one log line per episode.
	silent sync.Map
	// relMu orders releases (tryRelease) against the heartbeats' "synced"
	// (heartbeat); syncedSent is the hbClock time of the last heartbeat
	// that said "synced" (0: none). A waiting call takes relMu under its
	// Primary's lock: no other lock is taken under relMu.
	relMu      sync.Mutex
	syncedSent atomic.Int64
	expiryWake atomic.Bool // a wake-up is set for when syncedSent expires
	// vipFreeAt is when a takeover's checks last found the VIP free
	// (unix ns; 0: not since the last takeVIP).
	vipFreeAt atomic.Int64
	// pre is the takeover's precheck of the peer's current silence.
	pre atomic.Pointer[precheck]
	// vipProbe replaces vipCheck's ARP probe (tests).
	vipProbe func() (bool, string)
	// stages times the steps of durability calls (duet status --latency).
	stages latency.Stages
	// announcedAlone is the epoch of the last heartbeat sent as ALONE;
	// hbKick sends one at once (a new ALONE term is announced before any
	// durability call is released).
	announcedAlone atomic.Uint64
	hbKick         chan struct{}
	// staleUnsaved is set while this node's copy is stale and neither
	// cluster.json nor the stale mark could say so on disk (persist): the
	// heartbeats then do not say stale, so the primary keeps holding its
	// calls (a restart would find this node not stale); the loop tries
	// the save again each tick.
	staleUnsaved atomic.Bool
	// peerLostAt is when the peer was last declared lost, witnessOK when
	// the witness last answered (unix ns).
	peerLostAt atomic.Int64
	witnessOK  atomic.Int64
	// leaving is set while the node leaves the role; lastSynced is what
	// the heartbeats said of the peer before.
	leaving    atomic.Bool
	lastSynced atomic.Bool
	// leavingFail: the peer went silent while the node left the role and
	// the services were killed (watchLeaving); held calls now fail.
	leavingFail atomic.Bool
	// leavingAlone: when the node began to leave, the peer could not take
	// over (beginLeaving).
	leavingAlone atomic.Bool

	machine       atomic.Pointer[cluster.Machine]
	events        chan cluster.Event
	cmds          chan command
	hbMu          sync.Mutex
	hbAccepted    bool           // a heartbeat of the peer was accepted (under hbMu)
	guard         *cluster.Guard // shared by the networks: a heartbeat counts once
	lastHeartbeat atomic.Int64
	heartbeats    atomic.Uint64
	badHeartbeats atomic.Uint64
	missed        atomic.Uint64
	hooks         *hooks
}

// Run starts the daemon and blocks until ctx ends.
func Run(ctx context.Context, cfg *config.Config, log *slog.Logger) error {
	keys, err := cfg.ReadKeys()
	if err != nil {
		return err
	}
	lk, err := peerlink.New(peerlink.Options{Node: cfg.Node, Keys: keys, Plaintext: cfg.InsecurePlaintextLink})
	if err != nil {
		return err
	}
	if cfg.InsecurePlaintextLink {
		log.Warn("insecure_plaintext_link: true: replication travels unencrypted, and anyone on the path between the nodes can alter it after the handshake")
	}
	if len(keys) > 1 {
		log.Info("key rotation in progress: the peer may use key or previous_key; remove previous_key once both nodes run with the new key")
	}
	n := &Node{cfg: cfg, log: log, keys: keys, link: lk, events: make(chan cluster.Event, 64), cmds: make(chan command),
		hbKick: make(chan struct{}, 1), barrierTimeout: defaultBarrierTimeout}
	n.metrics = newMetrics(n.Status)
	if n.guard, err = newGuard(cfg); err != nil {
		return err
	}
	n.drained = sync.NewCond(&n.drainMu)
	for i, r := range cfg.Replicate {
		n.dirs = append(n.dirs, replica.Dir{Name: r.Name, Path: r.Path})
		t, err := checkTree(i, r.Path)
		if err != nil {
			return err
		}
		n.devs = append(n.devs, t.dev)
		n.xfs = n.xfs || t.xfs
		if t.btrfs != 0 && !slices.Contains(n.btrfs, t.btrfs) {
			n.btrfs = append(n.btrfs, t.btrfs)
		}
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state_dir %q: %w", cfg.StateDir, err)
	}
	if n.hooks, err = newHooks(cfg, log); err != nil {
		return err
	}
	for _, f := range cfg.Files {
		if err := writeFile(f.Path, f.Content); err != nil {
			return err
		}
	}
	metas := map[string]*replica.MetaStore{}
	for _, d := range n.dirs {
		ms, err := replica.OpenMeta(cfg.StateDir, d.Name)
		if err != nil {
			return err
		}
		if m := ms.Get(); m.Crashed {
			sp := "none (every file will be compared)"
			if m.SyncTime != 0 {
				sp = time.Unix(0, m.SyncTime).UTC().Format(time.RFC3339)
			}
			log.Warn("duet did not stop cleanly last time: this copy's changes since its sync point will be compared with the peer's",
				"dir", d.Name, "sync_point", sp)
		}
		metas[d.Name] = ms
		n.metas = append(n.metas, ms)
	}
	if v := cfg.VIP; v != nil {
		p, _ := netip.ParsePrefix(v.Address)
		n.vip = &vip.VIP{Prefix: p, Iface: v.Interface}
		if err := n.vip.Check(); err != nil {
			return err
		}
		// A crash may have left the address here: a node starts without it.
		if held, err := n.vip.Held(); err == nil && held {
			log.Warn("VIP left on this host by an earlier run: removing it", "vip", n.vip.String())
			if err := n.vip.Remove(); err != nil {
				return err
			}
		}
	}
	m, err := n.loadMachine()
	if err != nil {
		return err
	}
	// Loaded now, so that a kernel that refuses the programs is reported
	// at start; attached only when this node takes the primary role.
	first, err := capture.Load(n.captureOptions())
	if err != nil {
		return fmt.Errorf("capture: %w", err)
	}
	n.next = &preloaded{done: make(chan struct{}), c: first}
	close(n.next.done)
	defer func() {
		if c, err := n.takeCapture(); err == nil {
			c.Close()
		}
	}()
	// Services start through a re-exec of the running binary, not of the
	// path it was started from: a package upgrade replaces that file
	// before the daemon restarts, and the supervised child must speak
	// this daemon's protocol.
	const self = "/proc/self/exe"
	n.stack = newStack(cfg, log, self, n)
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %q: %w (is the address configured on this host, and the port free?)", cfg.Listen, err)
	}
	n.server = &replica.Server{Link: lk, StateDir: cfg.StateDir, Dirs: n.dirs, Log: log, Metas: metas, Stages: &n.stages,
		PeerAddrs: cfg.PeerAddrs()}
	n.server.SetAccept(true)
	hbConns, hbPeers, err := n.heartbeatConns()
	if err != nil {
		ln.Close()
		return err
	}
	ctl, err := n.listenControl()
	if err != nil {
		ln.Close()
		return err
	}
	defer ctl.Close()
	defer os.Remove(cfg.Socket)
	var metrics net.Listener
	if cfg.Metrics != "off" {
		if metrics, err = net.Listen("tcp", cfg.Metrics); err != nil {
			ln.Close()
			return fmt.Errorf("metrics %q: %w (set another address or metrics: off)", cfg.Metrics, err)
		}
		if cfg.Pprof && !loopback(metrics.Addr()) {
			log.Warn("pprof: true on an address other hosts may reach: they can read the daemon's profiles and have it profile its CPU", "metrics", cfg.Metrics)
		}
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	goRun := func(f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f()
		}()
	}
	goRun(func() {
		if err := n.server.Serve(ctx, ln); err != nil {
			log.Error("peer listener failed", "err", err)
			cancel()
		}
	})
	goRun(func() { n.serveControl(ctx, ctl) })
	if metrics != nil {
		goRun(func() { n.serveMetrics(ctx, metrics) })
	}
	n.machine.Store(&m)
	log.Info("duet running", "node", cfg.Node, "state", m.State.String(), "epoch", m.Epoch, "stale", m.Stale,
		"listen", cfg.Listen, "peer", cfg.Peer, "version", Version)
	if m.Stale {
		log.Info("this copy may be older than the peer's: it serves only after the peer is seen (or `duet prim --force`)")
	}
	n.runCluster(ctx, m, hbConns, hbPeers)
	ctl.Close()
	wg.Wait()
	n.detaching.Wait()
	n.server.Close(5 * time.Second)
	n.markClean()
	log.Info("duet stopped", "node", cfg.Node)
	return nil
}

// writeFile writes a module's generated file (tmp + rename).
func writeFile(path, content string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return os.Rename(tmp, path)
}

// markClean records a clean stop: every copy on disk, the bitmaps saved
// (when leaving the role), the unclean-shutdown markers cleared.
func (n *Node) markClean() {
	for i, d := range n.dirs {
		if f, err := os.Open(d.Path); err == nil {
			err = unix.Syncfs(int(f.Fd()))
			f.Close()
			if err != nil {
				n.log.Error("syncfs at stop: the next start counts as after a crash", "dir", d.Name, "err", err)
				continue
			}
		}
		if err := n.metas[i].Update(func(m *replica.Meta) { m.Running = false }); err != nil {
			n.log.Error("recording the clean stop", "dir", d.Name, "err", err)
		}
	}
}

// tree is what capture needs to know of a replicated directory.
type tree struct {
	dev   uint64 // its device, as stat(2) reports it
	xfs   bool   // on XFS: capture requires its hooks
	btrfs uint64 // on btrfs: the superblock's device (capture.BtrfsSuperblock)
}

// checkTree refuses a replicated directory whose filesystem capture
// cannot follow (docs/CAPTURE.md: ext4, XFS and btrfs, without another
// btrfs subvolume inside), and says what capture needs to watch it.
func checkTree(i int, path string) (tree, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return tree{}, fmt.Errorf("replicate[%d].path %q: %w", i, path, err)
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(path, &fs); err != nil {
		return tree{}, fmt.Errorf("replicate[%d].path %q: %w", i, path, err)
	}
	switch fs.Type {
	case ext4Magic:
		return tree{dev: st.Dev}, nil
	case unix.XFS_SUPER_MAGIC:
		return tree{dev: st.Dev, xfs: true}, nil
	case unix.BTRFS_SUPER_MAGIC:
		sb, err := capture.BtrfsSuperblock(path)
		if err != nil {
			return tree{}, fmt.Errorf("replicate[%d].path %q: %w", i, path, err)
		}
		// Another subvolume has its own device and inode numbers:
		// capture would not see its changes, and the replica would
		// take its inodes for the directory's own.
		subs, err := capture.BtrfsSubvolumesInside(path)
		if err != nil {
			return tree{}, fmt.Errorf("replicate[%d].path %q: looking for btrfs subvolumes inside: %w", i, path, err)
		}
		if len(subs) > 0 {
			return tree{}, fmt.Errorf("replicate[%d].path %q: holds btrfs subvolume %d (in %s): duet replicates one subvolume per directory; move the subvolume (or snapshot) out, or replicate it as a directory of its own", i, path, subs[0].ID, subs[0].Dir)
		}
		return tree{dev: st.Dev, btrfs: sb}, nil
	}
	return tree{}, fmt.Errorf("replicate[%d].path %q: filesystem type %#x is not supported: duet captures changes on ext4, XFS and btrfs only (see docs/CAPTURE.md); move the directory to one of them", i, path, fs.Type)
}

// serve takes the primary role: the VIP (unless someone answers for it)
// while capture loads, then shipping, then the services in order.
func (n *Node) serve(ctx context.Context) error {
	n.server.SetAccept(false)
	// Replication lives until unserve ends it, not until the daemon's
	// context does: a stopping primary still ships its last changes
	// while it hands over.
	sctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	capErr := make(chan error, 1)
	go func() { capErr <- n.startPrimary(sctx) }()
	vipErr := n.takeVIP(ctx)
	if err := <-capErr; err != nil || vipErr != nil {
		cancel()
		n.stopPrimary()
		if vipErr != nil {
			return vipErr
		}
		return err
	}
	n.smu.Lock()
	n.serveCancel = cancel
	n.smu.Unlock()
	if len(n.cfg.Services) > 0 {
		n.startServices(ctx)
	}
	return nil
}

// startServices starts the services in order, in the background: the
// cluster loop that carries out serve must go on hearing the peer
// meanwhile. A service's first durability calls wait on the peer; if it
// died during the start (a handover whose old primary then crashed), the
// loop blocked in the start could not declare it lost, so the calls held
// on it until the barrier's timeout failed them and the service with them
// (the fault campaign on btrfs, disk-full-primary-crash: the new primary
// stayed PRIM, its MariaDB stuck in its start, 30 s after the peer died).
func (n *Node) startServices(ctx context.Context) {
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	n.smu.Lock()
	n.startingCancel, n.startingDone = cancel, done
	n.smu.Unlock()
	go func() {
		defer close(done)
		if err := n.stack.Start(sctx); err != nil && sctx.Err() == nil {
			n.log.Error("services failed to start", "err", err)
			// sctx: endServiceStart waits for this goroutine while the
			// loop reads no events.
			n.post(sctx, cluster.Event{Kind: cluster.EvServiceDown, Why: err.Error()})
		}
	}()
}

// endServiceStart ends a start of the services still in progress (the
// service being started is killed; those started are left to Stop) and
// waits for it: no service may start once the node leaves the role.
func (n *Node) endServiceStart() {
	n.smu.Lock()
	cancel, done := n.startingCancel, n.startingDone
	n.startingCancel, n.startingDone = nil, nil
	n.smu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// post hands an event to the cluster loop, unless the daemon stops first.
func (n *Node) post(ctx context.Context, ev cluster.Event) {
	select {
	case n.events <- ev:
	case <-ctx.Done():
	}
}

// vipProbeWait is how long an ARP probe for the VIP waits for an owner
// (three requests in that time). A host holding the address answers from
// its kernel, in well under a millisecond on a LAN, however busy its
// processes are (a SIGSTOPped daemon's host answers too); every
// millisecond waited here is a millisecond of failover.
const vipProbeWait = 150 * time.Millisecond

// vipProbeFresh: a probe that found the VIP free this recently is not
// repeated before taking it.
const vipProbeFresh = 500 * time.Millisecond

// takeVIP adds and announces the VIP unless another host answers for it.
func (n *Node) takeVIP(ctx context.Context) error {
	if n.vip == nil {
		return nil
	}
	// A takeover's checks probed just before: a second probe would only
	// add its wait to the failover.
	if time.Since(time.Unix(0, n.vipFreeAt.Swap(0))) > vipProbeFresh {
		owner, err := n.vip.Probe(vipProbeWait)
		if err != nil {
			return err
		}
		if owner != nil {
			return fmt.Errorf("VIP %s is already in use by %s on the network", n.vip.Prefix.Addr(), owner)
		}
	}
	if err := n.vip.Add(); err != nil {
		return err
	}
	if err := n.vip.Announce(ctx, 1, 0); err != nil {
		n.log.Warn("gratuitous ARP", "err", err)
	}
	// More announcements, spaced, for switches that missed the first;
	// stopped before the VIP goes, or a node that handed over would go
	// on announcing an address the new primary now holds.
	actx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.vip.Announce(actx, 4, 500*time.Millisecond)
	}()
	n.smu.Lock()
	n.stopAnnounce = func() {
		cancel()
		<-done
	}
	n.smu.Unlock()
	n.log.Info("VIP up", "vip", n.vip.String())
	return nil
}

// unserve leaves the primary role: services stop, every change reaches
// the peer (if it is connected), the VIP goes, capture stops.
func (n *Node) unserve(ctx context.Context) {
	// Cleared by the cluster loop once the new state is published. From
	// here on no durability call is released without the peer (it is
	// taking over): each waits until its change is shipped, as the
	// services' shutdown flushes do. The loop runs this, so it cannot
	// learn meanwhile that the peer died: watchLeaving does, and then
	// kills the services (their pending calls never return) and fails
	// the calls still held. Failing them at once instead made MariaDB,
	// logging with its binary log, see EIO and still report the commit.
	n.beginLeaving()
	n.wakePrimaries()
	stopWatch := n.watchLeaving()
	defer stopWatch()
	n.endServiceStart()
	n.stack.Stop()
	n.smu.RLock()
	primaries := n.primaries
	n.smu.RUnlock()
	dctx, cancel := context.WithTimeout(ctx, n.barrierTimeout)
	for _, p := range primaries {
		if err := p.WaitShipped(dctx, kernel{n}, replica.Release{After: n.cfg.Cluster.Timeout}); err != nil {
			n.log.Warn("leaving the role with changes not on the peer (tracked for a resync)", "dir", p.Dir.Name, "err", err)
		} else if err := p.WaitSettled(dctx, replica.Release{After: n.cfg.Cluster.Timeout}); err != nil {
			n.log.Warn("leaving the role before the peer's copy settled (a resync will compare it)", "dir", p.Dir.Name, "err", err)
		} else if err := p.HandedOver(); err != nil {
			n.log.Warn("recording the handover", "dir", p.Dir.Name, "err", err)
		}
	}
	cancel()
	n.smu.Lock()
	stop := n.stopAnnounce
	n.stopAnnounce = nil
	n.smu.Unlock()
	if stop != nil {
		stop()
	}
	if n.vip != nil {
		if err := n.vip.Remove(); err != nil {
			n.log.Error("removing the VIP", "err", err)
		} else {
			n.log.Info("VIP down", "vip", n.vip.String())
		}
	}
	n.stopPrimary()
	n.server.SetAccept(true)
}

// beginLeaving marks the node as leaving the role, and notes whether the
// peer could take over at that moment. If it could not (this node is
// ALONE with the peer lost, or the peer's copy is stale: a plain stop),
// calls go on being released alone as while serving, and the services
// stop cleanly; otherwise (a swap, a step-down) nothing is released
// without the peer.
func (n *Node) beginLeaving() {
	n.relMu.Lock()
	defer n.relMu.Unlock()
	n.leavingAlone.Store(n.peerCannotTakeOver())
	n.leavingFail.Store(false)
	n.leaving.Store(true)
}

// watchLeaving watches the peer while the node leaves the role: once no
// heartbeat came for cluster.timeout, the services are killed and every
// durability call still held fails (leavingFail). It returns a function
// that ends the watch.
func (n *Node) watchLeaving() (stop func()) {
	if n.leavingAlone.Load() {
		// The peer could not take over: calls are released alone.
		return func() {}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(max(n.cfg.Cluster.Interval/4, 10*time.Millisecond))
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			silent := time.Since(time.Unix(0, n.lastHeartbeat.Load()))
			if silent < n.cfg.Cluster.Timeout {
				continue
			}
			n.log.Warn("the peer went silent while this node hands its role over: the services are killed, so that no durability call they wait on returns unconfirmed; other held calls fail",
				"silent_for", silent.Round(time.Millisecond))
			if n.stack != nil {
				n.stack.Kill()
			}
			n.leavingFail.Store(true)
			// A crashed peer's connection looks alive (no FIN) and
			// holds the calls as streaming: ended, they fail.
			n.smu.RLock()
			for _, p := range n.primaries {
				p.Drop("the peer went silent during the handover")
			}
			n.smu.RUnlock()
			return
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

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
		// The heartbeats say "synced" from now on: said at once, the
		// peer turns SECOND an interval sooner.
		p.OnResyncDone = n.kickHeartbeat
		p.Stages = &n.stages
		primaries = append(primaries, p)
		err = p.BeginTerm(replica.Term{Meta: n.metas[i], DirtyPath: filepath.Join(n.cfg.StateDir, "bitmap-"+d.Name),
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
	n.smu.Lock()
	n.cap, n.primaries = c, primaries
	n.overflowTo.Store(&primaries)
	n.eager.Store(false) // a new capture starts with lazy wake-ups
	n.serveCancel = func() {}
	n.dispatched.Store(0)
	n.overflowSeen = 0
	n.smu.Unlock()
	n.releasedAlone.Store(false)
	n.silent.Clear()
	n.serveWG.Add(2 + len(primaries))
	go func() {
		defer n.serveWG.Done()
		n.dispatch(c, primaries)
	}()
	go func() {
		defer n.serveWG.Done()
		n.watchOverflow(ctx, c)
	}()
	for _, p := range primaries {
		go func() {
			defer n.serveWG.Done()
			p.Run(ctx, kernel{n})
		}()
	}
	return nil
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

// dispatch hands every capture record to the primaries of its device.
func (n *Node) dispatch(c *capture.Capture, primaries []*replica.Primary) {
	var r capture.Record
	// One line per record at debug level: the raw material for finding
	// a missed change. Checked once; the hot path stays a branch.
	debug := n.log.Enabled(context.Background(), slog.LevelDebug)
	for {
		if err := c.Read(&r); err != nil {
			if !errors.Is(err, os.ErrClosed) {
				n.log.Error("reading capture ring buffer", "err", err)
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
		if n.drainWaiters.Load() > 0 {
			n.wakeDrains()
		}
	}
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
// and every record lost before it was turned into a rescan: the kernel's
// sequence counts successful reservations, each of which is submitted and
// read in turn; a lost record leaves a mark instead, which the barrier
// must see before it picks its target (the 50 ms watcher alone would let
// the durability call return before the lost write was shipped). Bounded
// by drainTimeout, in case the reader is stuck: past it the barrier's
// target misses the records not read yet, which is said in the log. Once
// the term's capture stopped reading (stopPrimary), the records not read
// never will be: an error, and the durability call fails (it returned
// "ok", its change shipped nowhere, while the node handed over).
func (k kernel) Drain() error {
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
	n.takeOverflow(c, ctr.Lost)
	target := ctr.Seq
	if n.dispatched.Load() >= target {
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
	for n.dispatched.Load() < target && !timedOut {
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
		n.log.Warn("capture reader behind by more than the drain timeout: a durability call goes on without its last records",
			"behind", target-n.dispatched.Load(), "timeout", drainTimeout)
	}
	return nil
}

// errNoCapture: the term's capture no longer reads records.
var errNoCapture = errors.New("the capture stopped reading: this node is leaving the primary role")

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
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if n.eager.Load() && time.Since(time.Unix(0, n.lastBarrier.Load())) > eagerHold {
			if c.SetEagerWake(false) == nil {
				n.eager.Store(false)
			}
		}
		ctr, err := c.Counters()
		if err != nil {
			continue
		}
		n.takeOverflow(c, ctr.Lost)
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

// Control requests and the cluster events they stand for.
var controlCommands = map[string]cluster.Event{
	"start":      {Kind: cluster.EvCmdStart},
	"stop":       {Kind: cluster.EvCmdStop},
	"prim":       {Kind: cluster.EvCmdPrim},
	"prim-force": {Kind: cluster.EvCmdPrim, Force: true},
	"second":     {Kind: cluster.EvCmdSecond},
	"swap":       {Kind: cluster.EvCmdSwap},
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
			br := bufio.NewReader(c)
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			// A barrier connection's first request may carry timings
			// too: the client's other connections answered calls.
			req := n.barrierReport(strings.TrimSpace(line), -1)
			if ev, ok := controlCommands[req]; ok {
				// Leaving the role may wait for the peer to catch up.
				c.SetDeadline(time.Now().Add(n.barrierTimeout + 30*time.Second))
				fmt.Fprintln(c, n.command(ctx, ev))
				return
			}
			switch req {
			case "resync", "resync-full":
				fmt.Fprintln(c, n.resync(req == "resync-full"))
			case "status":
				json.NewEncoder(c).Encode(n.Status())
			case "barrier":
				// A barrier connection stays open for the next
				// call: a supervised writer's fsyncs skip a
				// connect each. Each request may carry the
				// client's timings of earlier calls.
				c.SetDeadline(time.Time{})
				var took time.Duration // the daemon's part of the last call
				for req == "barrier" && err == nil {
					start := time.Now()
					reply := n.barrier(ctx)
					took = time.Since(start)
					if _, err = fmt.Fprintln(c, reply); err == nil {
						line, err = br.ReadString('\n')
						req = n.barrierReport(strings.TrimSpace(line), took)
					}
				}
			default:
				fmt.Fprintf(c, "{\"error\":%q}\n", "unknown request "+req)
			}
		}()
	}
}

// barrierReport takes the timings a barrier request carries ("barrier
// rtt=N held=N wait=N local=N", nanoseconds, each optional; see
// BarrierClient), counts them, and returns the bare request. rtt is the
// client's round trip of the previous call on this connection, whose
// daemon part was took (negative: no call before on this connection):
// the rest is the control socket's hop.
func (n *Node) barrierReport(line string, took time.Duration) string {
	req, fields, _ := strings.Cut(line, " ")
	if req != "barrier" {
		return line
	}
	for _, f := range strings.Fields(fields) {
		k, v, _ := strings.Cut(f, "=")
		ns, err := strconv.ParseInt(v, 10, 64)
		if err != nil || ns < 0 {
			continue
		}
		d := time.Duration(ns)
		switch k {
		case "rtt":
			if took >= 0 && d >= took {
				n.stages.Observe(latency.ControlHop, d-took)
			}
		case "held":
			n.stages.Observe(latency.Held, d)
		case "local":
			n.stages.Observe(latency.LocalFlush, d)
		}
	}
	return req
}

// observeCall counts the timing of a durability call held by a
// supervisor.
func (n *Node) observeCall(t barrier.Timing) {
	n.stages.Observe(latency.Held, t.Held)
	if t.Local > 0 {
		n.stages.Observe(latency.LocalFlush, t.Local)
	}
}

// resync starts a resync of every directory with the peer: from the
// bitmaps and sync points, or (full) by checksums of every file.
func (n *Node) resync(full bool) string {
	n.smu.RLock()
	primaries := n.primaries
	n.smu.RUnlock()
	if len(primaries) == 0 {
		return "refused: this node does not serve: run duet resync on the primary, which sends its copy"
	}
	for _, p := range primaries {
		p.Resync(full)
	}
	return "ok: resync started"
}

// noDaemon is the error of a command that finds no daemon behind socket,
// with the ways to start one.
func noDaemon(socket string, err error) error {
	if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("no duet daemon at %s (start it: systemctl start duet, or duet run --config FILE; or name another with --socket or --config): %w", socket, err)
	}
	return fmt.Errorf("no duet daemon at %s: %w", socket, err)
}

// Command sends an operator command (start, stop, prim, prim-force,
// second, swap) to the daemon behind socket and returns its answer.
func Command(socket, req string) (string, error) {
	c, err := net.DialTimeout("unix", socket, 2*time.Second)
	if err != nil {
		return "", noDaemon(socket, err)
	}
	defer c.Close()
	if _, err := fmt.Fprintln(c, req); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("%s: daemon gone: %w", req, err)
	}
	line = strings.TrimSpace(line)
	if !strings.HasPrefix(line, "ok") {
		return "", errors.New(line)
	}
	return line, nil
}

// eagerHold is how long after the last durability call every capture
// record still wakes the reader at once.
const eagerHold = 2 * time.Second

// defaultBarrierTimeout is Node.barrierTimeout: past it, a durability
// call that the peer did not confirm ends the peer's connection (see
// peerSilent); past twice that, the call fails (EIO) rather than claim
// durability.
const defaultBarrierTimeout = 30 * time.Second

// barrier waits until everything captured so far is on the peer: "ok",
// "alone" (no peer in sync: released, tracked for a resync), or
// "error: ...".
func (n *Node) barrier(ctx context.Context) string {
	if r := n.barrierRefusal(); r != "" {
		return r
	}
	m := n.machine.Load()
	start := time.Now()
	end := n.waiting.begin(start)
	defer func() {
		end()
		n.metrics.barriers.Observe(time.Since(start).Seconds())
		n.stages.Since(latency.Daemon, start)
	}()
	n.lastBarrier.Store(start.UnixNano())
	n.smu.RLock()
	primaries, c := n.primaries, n.cap
	n.smu.RUnlock()
	if len(primaries) != len(n.cfg.Replicate) {
		// The term's primaries are gone (stopPrimary: the role is being
		// handed over, the capture no longer sees writes) or not there
		// yet, while the state still serves: nothing can confirm the
		// call. Answered "ok", a write made then reached no record and
		// no peer (TestSwapTwice: 4 acknowledged records missing on the
		// new primary).
		return "error: this node is leaving (or not yet in) the primary role: the change is not confirmed on the peer"
	}
	if c != nil && c.Stopped() {
		// Checked here for every directory: an async one's call waits on
		// the lag alone, which knows nothing of writes the stopped
		// reader will never hand over (a sync one's Drain fails too).
		return "error: " + errNoCapture.Error()
	}
	if c != nil && !n.eager.Load() {
		if err := c.SetEagerWake(true); err == nil {
			n.eager.Store(true)
		}
	}
	// A peer that cannot take over (lost, or its copy is stale) does not
	// hold the call: the change stays here, tracked, until it is shipped.
	// One that could take over holds it until the change is on it, or
	// until the cluster learns it cannot (see peerCannotTakeOver).
	streaming := m.State == cluster.Prim
	for _, p := range primaries {
		streaming = streaming && p.Streaming()
	}
	if !streaming && n.tryRelease() {
		return n.alone()
	}
	wctx, cancel := context.WithTimeout(ctx, 2*n.barrierTimeout)
	defer cancel()
	silentAt := start.Add(n.barrierTimeout)
	reply := "ok"
	for i, p := range primaries {
		err := n.waitPeer(wctx, i, p, silentAt)
		switch {
		case errors.Is(err, replica.ErrAlone):
			if reply = n.alone(); reply != "alone" {
				return reply
			}
		case err != nil && wctx.Err() != nil && ctx.Err() == nil:
			return fmt.Sprintf("error: directory %s: the peer confirmed nothing for %s and did not say its copy is stale", p.Dir.Name, 2*n.barrierTimeout)
		case err != nil:
			return "error: " + err.Error()
		}
	}
	return reply
}

// waitPeer waits, for a durability call, until directory i's peer holds
// what the call needs (sync) or lags by at most max_lag (async), or the
// call may go on without it (ErrAlone, see peerCannotTakeOver). Not
// confirmed by silentAt, the peer is taken as silent (peerSilent): from
// then on the call is released as soon as the peer cannot take over,
// even if its connection comes back and streams.
func (n *Node) waitPeer(ctx context.Context, i int, p *replica.Primary, silentAt time.Time) error {
	var unconfirmed atomic.Bool
	t := time.AfterFunc(time.Until(silentAt), func() {
		if n.leaving.Load() {
			// A handover holds its calls until they are shipped, or the
			// peer is silent for cluster.timeout (watchLeaving).
			return
		}
		n.peerSilent(p)
		unconfirmed.Store(true)
		p.Wake()
	})
	defer t.Stop()
	rel := replica.Release{Now: n.tryRelease, Streaming: unconfirmed.Load}
	var err error
	if r := n.cfg.Replicate[i]; r.Mode == config.ModeAsync {
		err = p.WaitLag(ctx, r.MaxLag, rel)
	} else {
		err = p.WaitShipped(ctx, kernel{n}, rel)
	}
	if err == nil {
		n.silent.Delete(p) // the peer confirms again: a new episode may end its connection
	}
	return err
}

// peerSilent is done when a durability call waited barrierTimeout for p's
// peer. Until the peer confirms everything, the heartbeats say it is out
// of sync: it marks its copy stale, says so, and the call is released
// alone (or fails, with cluster.alone_writes: fail) under the usual rule.
// If the peer streams, connected and in sync yet confirming nothing (its
// disk hung, its applier stuck), its connection is ended too, once per
// episode, as the cluster loop does for a deaf peer. Failing the call
// instead, with the peer still an up-to-date SECOND, was unsafe: MariaDB
// may report a commit whose binary log flush got EIO, and the peer's
// takeover would lose it.
func (n *Node) peerSilent(p *replica.Primary) {
	n.relMu.Lock()
	n.aloneGen.Add(1) // a catch-up in progress does not count
	n.releasedAlone.Store(true)
	n.relMu.Unlock()
	if !p.Streaming() {
		return
	}
	if _, again := n.silent.LoadOrStore(p, true); again {
		return
	}
	why := "the peer confirmed nothing for " + n.barrierTimeout.String()
	n.log.Warn(why+": ending the replication connection", "dir", p.Dir.Name, "peer", n.machine.Load().Peer.Name)
	p.Drop(why)
}

// barrierRefusal is why a durability call fails at once, or "".
func (n *Node) barrierRefusal() string {
	if m := n.machine.Load(); !m.State.Serving() {
		return "error: this node is " + m.State.String() + ", not the primary"
	}
	// While the role is handed over a call waits to be shipped (never
	// released as "alone"), unless the peer went silent meanwhile.
	if n.leavingFail.Load() && n.leaving.Load() {
		return "error: the peer went silent while this node handed over the primary role"
	}
	return ""
}

// peerCannotTakeOver reports whether the peer can no longer take over with
// a copy that lacks what this node writes now, so that a durability call
// the peer did not confirm may be released. Either the cluster declared the
// peer lost, this node's heartbeats have announced ALONE since (a peer that
// still hears them marks its copy stale before anything is released) and
// the witness, if any, answered since (this node is not the cut-off one);
// or the peer says its copy is stale (a stopped peer is stale as soon as it
// hears this node serve). While the peer is heard as an up-to-date SECOND,
// a call the data path cannot confirm is held instead: released, the change
// could be lost by a takeover. The heartbeats then say the peer is out of
// sync, it marks its copy stale and says so, and the call is released. A
// peer that streams yet confirms nothing is told so after barrierTimeout
// (peerSilent).
func (n *Node) peerCannotTakeOver() bool {
	m := n.machine.Load()
	if m.State == cluster.Alone {
		// With a witness, only once it answered after the peer was lost:
		// a primary cut off from both would release writes that the
		// peer, taking over, never got (it steps down instead).
		witnessed := n.cfg.Cluster.Witness == "" || n.witnessOK.Load() > n.peerLostAt.Load()
		return n.announcedAlone.Load() == m.Epoch && witnessed
	}
	p := m.Peer
	return p.Seen && p.Stale && n.staleCurrent(p)
}

// staleCurrent reports whether the peer's "stale" (in heartbeat p) still
// holds: no heartbeat of ours that said "synced" can still make it SECOND.
// A peer turns SECOND on such a heartbeat; one sent just before a call is
// released may still be in flight, or accepted and not yet applied, while
// the peer's last heartbeat says stale. Released then, and this node dead
// within the next interval (whose heartbeat would say "not in sync"), the
// write would be lost by the peer's takeover. So the stale heartbeat must
// echo our last "synced" one, or that one must be too old for the peer to
// accept (its Guard refuses heartbeats older than cluster.timeout; twice
// that leaves room for the clocks' drift).
func (n *Node) staleCurrent(p cluster.Peer) bool {
	sent := time.Duration(n.syncedSent.Load())
	if sent == 0 {
		return true
	}
	if p.EchoBoot == n.guard.Boot() && p.EchoTime >= sent {
		return true
	}
	left := 2*n.cfg.Cluster.Timeout - (hbClock() - sent)
	if left < 0 {
		return true
	}
	// Nothing else may happen by then to look again.
	if n.expiryWake.CompareAndSwap(false, true) {
		time.AfterFunc(left+time.Millisecond, func() {
			n.expiryWake.Store(false)
			n.wakePrimaries()
		})
	}
	return false
}

// tryRelease is Release.Now: whether a durability call may go on without
// the peer (peerCannotTakeOver). A release is recorded in the same step,
// under relMu, so that the heartbeats cannot say "synced" after a check
// that relied on none being sent (see heartbeat).
func (n *Node) tryRelease() bool {
	n.relMu.Lock()
	defer n.relMu.Unlock()
	if n.leaving.Load() {
		if n.leavingFail.Load() {
			return true // fails: the peer went silent (watchLeaving)
		}
		if !n.leavingAlone.Load() {
			// Handing the role over to a peer that can take it: never
			// released alone (the peer would take over without it).
			return false
		}
	}
	if !n.peerCannotTakeOver() {
		return false
	}
	n.aloneGen.Add(1)
	n.releasedAlone.Store(true)
	return true
}

// wakePrimaries has every waiting durability call look again at what the
// cluster knows of the peer.
func (n *Node) wakePrimaries() {
	n.smu.RLock()
	defer n.smu.RUnlock()
	for _, p := range n.primaries {
		p.Wake()
	}
}

// alone answers a durability call that no peer in sync can confirm:
// released and tracked for a resync, or refused (cluster.alone_writes).
func (n *Node) alone() string {
	if n.leaving.Load() && (n.leavingFail.Load() || !n.leavingAlone.Load()) {
		// The peer is taking over: released, the change would be lost.
		return "error: the primary role was handed over before this change was shipped"
	}
	if n.cfg.Cluster.AloneWrites == config.AloneFail {
		return "error: no peer in sync, and cluster.alone_writes is fail"
	}
	return "alone"
}

// BarrierClient asks the daemon behind Socket to wait until every change
// is on the peer. It keeps idle connections for the next calls; safe for
// concurrent use (each call in progress holds a connection of its own).
type BarrierClient struct {
	Socket string
	idle   chan *barrierConn

	mu      sync.Mutex
	reports []string // timings of answered calls, for the next requests
}

type barrierConn struct {
	c   net.Conn
	br  *bufio.Reader
	rtt time.Duration // of the last call on this connection
}

// Report hands the timing of an answered durability call to the daemon
// with a later request, for `duet status --latency`.
func (b *BarrierClient) Report(t barrier.Timing) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.reports) < 64 { // a burst beyond is not worth holding
		b.reports = append(b.reports, fmt.Sprintf("held=%d local=%d", t.Held, t.Local))
	}
}

// request is the next request line: "barrier", with this connection's
// last round trip and one pending report.
func (b *BarrierClient) request(bc *barrierConn) string {
	req := "barrier"
	if bc.rtt > 0 {
		req += fmt.Sprintf(" rtt=%d", bc.rtt)
	}
	b.mu.Lock()
	if len(b.reports) > 0 {
		req += " " + b.reports[0]
		b.reports = b.reports[1:]
	}
	b.mu.Unlock()
	return req
}

// NewBarrierClient returns a client of the daemon behind socket.
func NewBarrierClient(socket string) *BarrierClient {
	return &BarrierClient{Socket: socket, idle: make(chan *barrierConn, 16)}
}

// Wait returns nil once the changes made so far are durable on the peer,
// or were released because no peer is in sync (alone).
func (b *BarrierClient) Wait() error {
	var bc *barrierConn
	select {
	case bc = <-b.idle:
	default:
	}
	if bc != nil {
		line, err := bc.call(b.request(bc))
		if err == nil {
			return b.done(bc, line)
		}
		bc.c.Close() // the daemon restarted since: try a new connection
	}
	c, err := net.DialTimeout("unix", b.Socket, 2*time.Second)
	if err != nil {
		return noDaemon(b.Socket, err)
	}
	bc = &barrierConn{c: c, br: bufio.NewReader(c)}
	line, err := bc.call(b.request(bc))
	if err != nil {
		c.Close()
		return fmt.Errorf("barrier: daemon gone: %w", err)
	}
	return b.done(bc, line)
}

func (bc *barrierConn) call(req string) (string, error) {
	start := time.Now()
	if _, err := bc.c.Write([]byte(req + "\n")); err != nil {
		return "", err
	}
	line, err := bc.br.ReadString('\n')
	bc.rtt = time.Since(start)
	return strings.TrimSpace(line), err
}

func (b *BarrierClient) done(bc *barrierConn, line string) error {
	select {
	case b.idle <- bc:
	default:
		bc.c.Close()
	}
	switch line {
	case "ok", "alone":
		return nil
	}
	return errors.New(line)
}

// Status collects the daemon's state.
func (n *Node) Status() Status {
	m := n.machine.Load()
	s := Status{Node: n.cfg.Node, Role: n.cfg.Role, State: m.State.String(), Epoch: m.Epoch, Stale: m.Stale,
		Version: Version, Listen: n.cfg.Listen, Peer: n.cfg.Peer}
	s.PeerState = PeerStatus{Seen: m.Peer.Seen, Name: m.Peer.Name, Epoch: m.Peer.Epoch,
		Heartbeats: n.heartbeats.Load(), Refused: n.badHeartbeats.Load(), Lost: n.missed.Load()}
	if m.Peer.Name != "" {
		s.PeerState.State = m.Peer.State.String()
	}
	if t := n.lastHeartbeat.Load(); t != 0 {
		s.PeerState.LastHeartbeat = float64(time.Since(time.Unix(0, t)).Microseconds()) / 1000
	}
	if n.vip != nil {
		vs := &VIPStatus{Address: n.vip.Prefix.String(), Interface: n.vip.Iface}
		held, err := n.vip.Held()
		vs.Held = held
		if err != nil {
			vs.Error = err.Error()
		}
		s.VIP = vs
	}
	s.Services = n.stack.Status()
	s.LagHistogram, s.BarrierHistogram = snapshot(n.metrics.lags), snapshot(n.metrics.barriers)
	waiting, oldest := n.waiting.oldest(time.Now())
	s.BarriersWaiting, s.BarrierOldestWaitMs = waiting, float64(oldest.Microseconds())/1000
	n.smu.RLock()
	c, primaries := n.cap, n.primaries
	n.smu.RUnlock()
	s.Latency = n.stages.Snapshot()
	s.InSync = m.State == cluster.Second || m.State == cluster.Prim && m.Peer.State == cluster.Second
	if c != nil {
		s.Hooks = c.Hooks()
		if ctr, err := c.Counters(); err == nil {
			s.Capture = &ctr
		}
		s.RingBytes = c.Buffered()
		if s.RingBytes > 0 {
			s.InSync = false
		}
	}
	for i, p := range primaries {
		ps := p.Status()
		ps.Mode = n.cfg.Replicate[i].Mode
		ps.MaxLagMs = float64(n.cfg.Replicate[i].MaxLag.Milliseconds())
		s.InSync = s.InSync && ps.InSync
		s.LagMs = max(s.LagMs, ps.LagMs)
		s.LagBytes += ps.UnackedBytes
		s.Dirs = append(s.Dirs, ps)
	}
	for i, d := range n.dirs {
		mt := n.metas[i].Get()
		cs := CopyStatus{Dir: d.Name, Gen: fmt.Sprintf("%016x", mt.Gen), Source: mt.Source, Consistent: mt.Consistent,
			Crashed: mt.Crashed, SyncSeq: mt.SyncSeq}
		if mt.SyncTime != 0 {
			cs.SyncPoint = time.Unix(0, mt.SyncTime).UTC().Format(time.RFC3339Nano)
		}
		var fs unix.Statfs_t
		if err := unix.Statfs(d.Path, &fs); err == nil {
			unit := uint64(fs.Frsize) // the counts' unit (f_frsize)
			if unit == 0 {
				unit = uint64(fs.Bsize)
			}
			cs.FreeBytes, cs.SizeBytes = fs.Bavail*unit, fs.Blocks*unit
		}
		s.Copies = append(s.Copies, cs)
	}
	s.Module = n.cfg.Module
	s.EventHook, s.LostPeer = n.hooks.status()
	if !m.State.Serving() {
		for _, d := range n.cfg.Replicate {
			st := n.server.Stats(d.Name)
			rs := ReplicaStatus{Dir: d.Name, Path: d.Path, Connected: st.Connected.Load(),
				Peer: st.Peer.Load().(string), Batches: st.Batches.Load(), Ops: st.Ops.Load(),
				LastSeq: st.Applied.Load(), LastError: st.LastError.Load().(string)}
			rs.Syncs = st.Syncs.Load()
			if b := st.Batches.Load(); b > 0 {
				rs.ApplyAvgMs = float64(st.ApplyNs.Load()) / float64(b) / 1e6
			}
			if rs.Syncs > 0 {
				rs.SyncAvgMs = float64(st.SyncNs.Load()) / float64(rs.Syncs) / 1e6
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
		return s, noDaemon(socket, err)
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

// loopback tells whether a listener's address is a loopback one.
func loopback(a net.Addr) bool {
	t, ok := a.(*net.TCPAddr)
	return ok && t.IP.IsLoopback()
}
