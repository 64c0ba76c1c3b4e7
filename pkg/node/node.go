// Package node runs a duet daemon: capture and shipping on the primary,
// applying on the secondary, manifests for verify on both, and the control
// socket that `duet status` reads.
package node

import (
	"context"
	"errors"
	"fmt"
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

// ext4Magic is EXT4_SUPER_MAGIC (statfs f_type).
const ext4Magic = 0xEF53

// Node is a running daemon.
type Node struct {
	// exit ends the daemon's process (nil: os.Exit; tests replace it).
	exit func(code int)
	// failedDisks: the names of the directories whose filesystem failed
	// in this term, and why (diskFailed).
	failedDisks sync.Map
	dispatched  atomic.Uint64 // records handed to the primaries
	// dispatchedEnd is the ring position past the last record handed to
	// the primaries (capture.Record.End): what Drain waits on.
	dispatchedEnd atomic.Uint64
	metas         []*replica.MetaStore // per directory, as n.dirs
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
	// lastBarrier (bootNanos) keeps the capture's eager wake-ups on while
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
	// (bootNanos; 0: not since the last takeVIP).
	vipFreeAt atomic.Int64
	// vipMu orders a VIP's adding (takeVIP) with failAsCrashed, which
	// sets failing first: a term starting while the state_dir's watcher
	// fails the node must not add the address after it was removed, the
	// daemon gone and the peer kept from taking over (from a review).
	vipMu   sync.Mutex
	failing bool
	// stateProbed counts the running serving watchers that probe the
	// state_dir's filesystem (watchDisks): watchStateDir does not while
	// one does.
	stateProbed atomic.Int32
	// marksAudited counts the audits of the capture's marks that judged
	// (auditMarksOnce).
	marksAudited atomic.Uint64
	// pre is the takeover's precheck of the peer's current silence.
	pre atomic.Pointer[precheck]
	// vipProbe replaces vipCheck's ARP probe (tests); a failure counts as
	// the VIP answered.
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
	// the witness last answered (bootNanos).
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
	// The start wait (startwait.go): started is when the daemon started
	// (or left an ALONE term: markAgainLocked), bootNanos; startWait is set
	// when this node takes nothing over before hearing its peer;
	// peerHeard once a heartbeat of the peer settled it. The
	// peer-in-sync mark, under markMu: markOn says it may be on disk,
	// markEpoch the term it was made for, savedPrim the epoch of the last
	// PRIM state saved (0: the last save was not PRIM), aloneFromSynced
	// that the ALONE term saved last began with the peer in sync, at
	// aloneSince.
	started         atomic.Int64
	startWait       atomic.Bool
	startWaitOver   atomic.Bool
	peerHeard       atomic.Bool
	markMu          sync.Mutex
	markOn          bool
	markEpoch       uint64
	savedPrim       uint64
	aloneFromSynced bool
	aloneSince      time.Time
	markErr         atomic.Bool
	// saidStop: a daemon stopping while WAIT or SECOND saved and
	// published STOP for its last heartbeats (loop).
	saidStop atomic.Bool

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
	// A crash may have left the VIP here: a node starts without it. First
	// of all, before anything on the disks is read (the key file; the
	// replicated directories, whose stat answers EIO on a shut-down XFS):
	// a daemon that failed on a dead disk and cannot start again must not
	// keep the peer from taking over (from a review).
	var theVIP *vip.VIP
	if v := cfg.VIP; v != nil {
		p, _ := netip.ParsePrefix(v.Address)
		theVIP = &vip.VIP{Prefix: p, Iface: v.Interface}
		if err := theVIP.Check(); err != nil {
			return err
		}
		if held, err := theVIP.Held(); err == nil && held {
			log.Warn("VIP left on this host by an earlier run: removing it", "vip", theVIP.String())
			if err := theVIP.Remove(); err != nil {
				return err
			}
		}
	}
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
	n.vip = theVIP
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
		if why := syncTree(r.Path); why != "" && r.Mode == config.ModeSync {
			return fmt.Errorf("replicate[%d].path %q: %s: writes there are durable when they return, before the peer has them, which a sync directory must not allow; %s", i, r.Path, why, syncTreeFix)
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
	firstClock, _ := readClocks() // before the check: a step from here on is the watcher's
	n.checkClockAtStart()
	m, err := n.loadMachine()
	if err != nil {
		return err
	}
	n.loadStartWait(m)
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
		PeerAddrs: cfg.PeerAddrs(), Admit: n.admitPrimary}
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
	goRun(func() { n.watchStateDir(ctx) })
	goRun(func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		watchClock(ctx, t.C, firstClock, readClocks, n.clockStepped)
	})
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

// syncTree says why writes under path would be durable on return
// without passing through duet's barrier, or "": a filesystem mounted
// with -o sync, or the directory flagged synchronous (chattr +S; +D for
// its entries), which ext4 hands on to the files and directories made in
// it. (Supervised processes are refused these flags: barrier.setflagsSync.)
func syncTree(path string) string {
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err == nil && fs.Flags&unix.ST_SYNCHRONOUS != 0 {
		return "its filesystem is mounted with -o sync"
	}
	if superOptions(path)["dirsync"] {
		return "its filesystem is mounted with -o dirsync"
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return ""
	}
	defer unix.Close(fd)
	flags, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
	if err != nil {
		return ""
	}
	switch {
	case flags&fsSyncFL != 0:
		return "the directory has the synchronous attribute (chattr +S)"
	case flags&fsDirsyncFL != 0:
		return "the directory has the synchronous-entries attribute (chattr +D)"
	}
	return ""
}

// superOptions are the superblock options /proc/self/mountinfo shows for
// the mount path is on (sync, dirsync, lazytime...: statfs does not report
// dirsync); none if it cannot be read.
func superOptions(path string) map[string]bool {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_MNT_ID, &stx); err != nil || stx.Mask&unix.STATX_MNT_ID == 0 {
		return nil
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	id := strconv.FormatUint(stx.Mnt_id, 10)
	for _, line := range strings.Split(string(b), "\n") {
		// "36 35 98:0 /mnt1 /mnt2 rw,noatime - ext4 /dev/sda1 rw,dirsync"
		fields := strings.Fields(line)
		if len(fields) == 0 || fields[0] != id {
			continue
		}
		opts := map[string]bool{}
		for i, f := range fields {
			if f == "-" && i+3 < len(fields) {
				for _, o := range strings.Split(fields[i+3], ",") {
					opts[o] = true
				}
			}
		}
		return opts
	}
	return nil
}

const (
	fsSyncFL    = 0x00000008 // FS_SYNC_FL
	fsDirsyncFL = 0x00010000 // FS_DIRSYNC_FL
	syncTreeFix = "remount without sync, or clear the attribute (chattr -S -D), or make the directory mode: async"
)

// serve takes the primary role: the VIP (unless someone answers for it)
// while capture loads, then shipping (startStreams), then the services in
// order. taken
// is called once the VIP and the capture are held, before the services
// start; it is not called when serve fails.
func (n *Node) serve(ctx context.Context, taken func()) error {
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
	n.startStreams(sctx)
	taken()
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
	if bootSince(n.vipFreeAt.Swap(0)) > vipProbeFresh {
		owner, err := n.vip.Probe(vipProbeWait)
		if err != nil {
			return err
		}
		if owner != nil {
			return fmt.Errorf("VIP %s is already in use by %s on the network", n.vip.Prefix.Addr(), owner)
		}
	}
	n.vipMu.Lock()
	if n.failing {
		n.vipMu.Unlock()
		return errors.New("this node is failing as a crashed daemon does: the VIP is not added")
	}
	err := n.vip.Add()
	n.vipMu.Unlock()
	if err != nil {
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
// the peer (if it is connected), the VIP goes, capture stops. replaced:
// the state this node leaves for counts its copy stale (a split brain
// lost, or a step down for the peer's newer copy: cluster.Machine.Shared):
// nothing it released now would survive the peer's resync.
func (n *Node) unserve(ctx context.Context, replaced bool) {
	// Cleared by the cluster loop once the new state is published. From
	// here on no durability call is released without the peer (it is
	// taking over): each waits until its change is shipped, as the
	// services' shutdown flushes do. The loop runs this, so it cannot
	// learn meanwhile that the peer died: watchLeaving does, and then
	// kills the services (their pending calls never return) and fails
	// the calls still held. Failing them at once instead made MariaDB,
	// logging with its binary log, see EIO and still report the commit.
	n.beginLeaving(replaced)
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
		if n.failedDisk(p.Dir.Name) != "" {
			// Its filesystem failed: what it held unwritten is lost,
			// though the peer may have it. No handover is recorded.
			n.log.Warn("leaving the role with the copy's disk failed: no handover recorded, the next resync compares it", "dir", p.Dir.Name)
		} else if err := p.WaitShipped(dctx, kernel{n}, replica.Release{After: n.cfg.Cluster.Timeout}); err != nil {
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
		if err := n.removeVIP(); err != nil {
			n.log.Error("removing the VIP failed: this host still answers for it and the peer will not take over; "+
				"remove it by hand (ip addr del) or restart duet here, which removes it or stops", "vip", n.vip.String(), "err", err)
		} else {
			n.log.Info("VIP down", "vip", n.vip.String())
		}
	}
	n.stopPrimary()
	n.server.SetAccept(true)
}

// removeVIP removes the VIP, retried: left on this host, it answers for a
// node that no longer serves, and the peer's probe finds it held (it does
// not take over). Removal is strict only at the daemon's start.
func (n *Node) removeVIP() error {
	var err error
	for try := 0; try < 5; try++ {
		if try > 0 {
			time.Sleep(200 * time.Millisecond)
		}
		if err = n.vip.Remove(); err == nil {
			return nil
		}
	}
	return err
}

// beginLeaving marks the node as leaving the role, and notes whether the
// peer could take over at that moment. If it could not (this node is
// ALONE with the peer lost, or the peer's copy is stale: a plain stop),
// calls go on being released alone as while serving, and the services
// stop cleanly; otherwise (a swap, a step-down) nothing is released
// without the peer. Nor when this node leaves because its copy is
// replaced (replaced): what it released alone would be acknowledged and
// then overwritten by the peer's copy. The published machine is still
// the serving one while the node leaves (ALONE, say, announced and
// witnessed, on which peerCannotTakeOver says yes): a Shared primary
// stepping down for its peer's newer copy released the calls its
// services made while they stopped (a review: TestSharedStepDownReleasesAlone).
// Held, they fail once the term ends: not acknowledged.
func (n *Node) beginLeaving(replaced bool) {
	n.relMu.Lock()
	defer n.relMu.Unlock()
	n.leavingAlone.Store(!replaced && n.peerCannotTakeOver())
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
			silent := bootSince(n.lastHeartbeat.Load())
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
