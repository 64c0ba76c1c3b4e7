package node

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
	"golang.org/x/sys/unix"
)

// diskProbeInterval is how often a serving node checks the filesystems of
// its replicated directories and of its state_dir, and a node that does
// not serve its state_dir's (diskProbe).
const diskProbeInterval = time.Second

// diskProbeHang is how long a probe may go unanswered before the disk
// counts as failed: a disk that no longer answers leaves every I/O on it
// waiting, and a flush that slow is no longer load.
const diskProbeHang = 60 * time.Second

// termStartWait bounds the check, at a term's start in the cluster loop,
// of a disk that failed earlier: no answer by then, it stays failed.
const termStartWait = 2 * time.Second

// prober runs diskProbe for one directory, one call at a time: a probe
// stuck in a hung disk's fsync is not joined by another each retry.
type prober struct {
	dir  string
	dev  uint64
	busy atomic.Bool
}

// probe is diskProbe, an errProbeHung after wait (or at once while an
// earlier probe has not returned), or ctx's error.
func (p *prober) probe(ctx context.Context, wait time.Duration) error {
	if !p.busy.CompareAndSwap(false, true) {
		return fmt.Errorf("an earlier probe has not returned: %w", errProbeHung)
	}
	res := make(chan error, 1)
	go func() {
		res <- diskProbe(p.dir, p.dev)
		p.busy.Store(false)
	}()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case err := <-res:
		return err
	case <-t.C:
		return fmt.Errorf("no answer in %s: %w", wait, errProbeHung)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// diskFailedRepeat is how often a disk that still fails is reported again
// to the cluster loop (which keeps the role while no peer is in sync).
const diskFailedRepeat = 10 * time.Second

// errReadOnly: the filesystem is mounted read-only.
var errReadOnly = errors.New("the filesystem is read-only (remounted after an error?)")

// errNotItsFilesystem: the directory is no longer on the filesystem it
// was on at start (unmounted, for a repair say): what is there now is the
// mountpoint, whose emptiness a resync would give the peer.
var errNotItsFilesystem = errors.New("the directory is no longer on its filesystem (unmounted?)")

// diskProbe checks that the filesystem under dir still takes writes: not
// read-only (remounted so after an error: ext4's errors=remount-ro, btrfs
// on a failed transaction) and not shut down (XFS on a failed metadata
// write, ext4's journal abort: fsync of the directory fails with EIO or
// EROFS). It writes nothing into the tree.
//
// dev, if not 0, is the directory's device at start: another one means
// its filesystem is gone from under it (errNotItsFilesystem).
func diskProbe(dir string, dev uint64) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	defer unix.Close(fd)
	if dev != 0 {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return fmt.Errorf("stat: %w", err)
		}
		if st.Dev != dev {
			return errNotItsFilesystem
		}
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("statfs: %w", err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return errReadOnly
	}
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	return nil
}

// diskBroken says whether a probe's error is the disk's failure: EIO,
// EROFS, a read-only mount, or no answer. Others (a directory removed or
// replaced, a lack of memory or descriptors) are said in the log and
// change nothing: a role handed over for them would be a false takeover.
func diskBroken(err error) bool {
	return errors.Is(err, syscall.EIO) || errors.Is(err, syscall.EROFS) || errors.Is(err, errReadOnly) ||
		errors.Is(err, errNotItsFilesystem) || errors.Is(err, errProbeHung)
}

// errProbeHung: a probe did not return in time.
var errProbeHung = errors.New("the disk does not answer")

// probeUnit is one filesystem to probe: through one of its replicated
// directories, or the state_dir.
type probeUnit struct {
	path  string
	dev   uint64 // path's device at start (0: not checked)
	dirs  []int  // the replicated directories on it
	state bool   // it holds the state_dir
}

// probeUnits lists the filesystems to probe, one per device.
func (n *Node) probeUnits() []*probeUnit {
	var units []*probeUnit
	byDev := map[uint64]*probeUnit{}
	for i, d := range n.dirs {
		if i < len(n.devs) {
			if u := byDev[n.devs[i]]; u != nil {
				u.dirs = append(u.dirs, i)
				continue
			}
		}
		u := &probeUnit{path: d.Path, dirs: []int{i}}
		if i < len(n.devs) {
			byDev[n.devs[i]] = u
			u.dev = n.devs[i]
		}
		units = append(units, u)
	}
	var st unix.Stat_t
	if n.cfg.StateDir != "" && unix.Stat(n.cfg.StateDir, &st) == nil {
		if u := byDev[st.Dev]; u != nil {
			u.state = true
		} else {
			units = append(units, &probeUnit{path: n.cfg.StateDir, dev: st.Dev, state: true})
		}
	}
	return units
}

// watchDisks probes, while the node serves, every filesystem it depends on
// every diskProbeInterval, each on its own (a hung one holds up no
// other). A replicated directory's that failed is marked (diskFailed) and
// the cluster loop told (EvDiskFailed): the node gives the role to a peer
// in sync. The state_dir's failing makes the node fail as a crashed
// daemon does (failAsCrashed): it could no longer record that it gave the
// role away, nor that its copy is stale, and said "not stale" on, which
// held the new primary's durability calls for as long as it ran (from a
// review). A primary whose disk had died went on serving from it, holding
// the VIP, unless a service noticed and failed (one that only reads, or
// NFS clients that wait, does not).
func (n *Node) watchDisks(ctx context.Context) {
	units := n.probeUnits()
	if slices.ContainsFunc(units, func(u *probeUnit) bool { return u.state }) {
		n.stateProbed.Add(1)
		defer n.stateProbed.Add(-1)
	}
	n.watchUnits(ctx, units, nil)
}

// watchStateDir probes the state_dir's filesystem for the daemon's whole
// run, in every role (STOP included), except while a serving term's
// watchDisks does it (its context is ended first thing when the term
// ends, not once its goroutines are gone: a Primary stuck in a dead
// disk's read holds stopPrimary, and this watcher takes over within a
// probe interval; from a review). A failure makes the node fail as a
// crashed daemon does. A secondary, or a primary that had just handed the
// role over, with its state_dir's disk dead had stayed up for ever: it
// could record nothing (its copy's sync point, that its copy is stale),
// its heartbeats kept the peer PRIM instead of ALONE, and, its stale mark
// unsaved, held the new primary's durability calls. A nemesis run found
// it: MariaDB's check failed on the read-only disk before the next probe,
// the role was handed over, and the old primary stayed a secondary that
// could not apply. A disk that stops answering is seen only if the
// directory's fsync has something to write, which on a node that does not
// serve is rare.
func (n *Node) watchStateDir(ctx context.Context) {
	var st unix.Stat_t
	if n.cfg.StateDir == "" {
		return
	}
	if err := unix.Stat(n.cfg.StateDir, &st); err != nil {
		if diskBroken(err) {
			n.stateDirFailed(err)
			return
		}
		n.log.Error("the state_dir cannot be probed: a failure of its disk will not be seen while this node does not serve", "state_dir", n.cfg.StateDir, "err", err)
		return
	}
	units := []*probeUnit{{path: n.cfg.StateDir, dev: st.Dev, state: true}}
	n.watchUnits(ctx, units, func() bool { return n.stateProbed.Load() > 0 })
}

// stateDirFailed makes the node fail as a crashed daemon does, the disk
// holding its state_dir failed with err.
func (n *Node) stateDirFailed(err error) {
	if errors.Is(err, errNotItsFilesystem) || errors.Is(err, syscall.ENOENT) {
		n.failWith(exitNotRestarted, "the state_dir or its filesystem is gone (unmounted?): this node fails as a crashed daemon does (services killed, VIP removed, the daemon exits) and is not restarted by its unit; mount it again, then start duet",
			"state_dir", n.cfg.StateDir, "err", err, "exit_status", exitNotRestarted)
		return
	}
	n.failAsCrashed("the disk holding state_dir failed: this node fails as a crashed daemon does (services killed, VIP removed, the daemon exits)",
		"state_dir", n.cfg.StateDir, "err", err)
}

// watchUnits is watchDisks on the filesystems units. While skip (if not
// nil) says so, no new probe starts; one in flight is still judged.
func (n *Node) watchUnits(ctx context.Context, units []*probeUnit, skip func() bool) {
	type result struct {
		u   *probeUnit
		err error
	}
	results := make(chan result, len(units))
	started := map[*probeUnit]time.Time{} // probes in flight
	hung := map[*probeUnit]bool{}         // reported as hung, still in flight
	reported := map[*probeUnit]time.Time{}
	warned := map[*probeUnit]time.Time{}
	failed := func(u *probeUnit, err error) {
		if u.state {
			// First, and nothing written: a write to the state_dir
			// waits for ever on a disk that stopped answering (from a
			// review). The restart finds the copies Crashed.
			n.stateDirFailed(err)
			return
		}
		for _, i := range u.dirs {
			n.diskFailed(i, err)
		}
		if time.Since(reported[u]) < diskFailedRepeat {
			return
		}
		reported[u] = time.Now()
		d := n.dirs[u.dirs[0]]
		n.log.Error("the disk under a replicated directory fails: the role goes to the peer if it is in sync",
			"dir", d.Name, "path", d.Path, "err", err)
		n.post(ctx, cluster.Event{Kind: cluster.EvDiskFailed, Why: fmt.Sprintf("directory %s (%s): %v", d.Name, d.Path, err)})
	}
	t := time.NewTicker(diskProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case r := <-results:
			delete(started, r.u)
			delete(hung, r.u)
			switch {
			case r.err == nil:
			case diskBroken(r.err), r.u.path == n.cfg.StateDir && errors.Is(r.err, syscall.ENOENT):
				// The state_dir gone (its filesystem unmounted
				// from under it): nothing can be recorded either.
				// (A replicated directory removed is no failed disk.)
				failed(r.u, r.err)
			case time.Since(warned[r.u]) >= diskFailedRepeat:
				warned[r.u] = time.Now()
				n.log.Warn("probing a filesystem failed, not as a failed disk does: nothing done", "path", r.u.path, "err", r.err)
			}
		case <-t.C:
			idle := skip != nil && skip()
			for _, u := range units {
				if at, ok := started[u]; ok {
					if !hung[u] && time.Since(at) > diskProbeHang {
						hung[u] = true
						failed(u, fmt.Errorf("no answer in %s: %w", diskProbeHang, errProbeHung))
					}
					continue
				}
				if idle {
					continue
				}
				started[u] = time.Now()
				go func() { results <- result{u, diskProbe(u.path, u.dev)} }()
			}
		}
	}
}

// diskFailed records that the filesystem of directory i failed, for it
// and every directory on the same device, until a term starts with the
// disk passing its check again: their copies count as after a crash
// (Meta.Crashed) until a resync completes, and their primaries start no
// connection or resync, move no sync point and record no handover
// (replica.Primary.DiskFailed), nor does leaving the role (failedDisk). What the filesystem held unwritten is
// lost with it, though the peer may have it: a handover recorded after the
// failure (its syncfs finds nothing to write on a filesystem turned
// read-only) claimed the copy consistent, and the next resync, from the
// bitmap, left the difference in place.
func (n *Node) diskFailed(i int, err error) {
	for j, d := range n.dirs {
		if j != i && (j >= len(n.devs) || i >= len(n.devs) || n.devs[j] != n.devs[i]) {
			continue
		}
		// Marked again even if known: a resync since may have cleared
		// the copy's Crashed mark (from a review).
		n.failedDisks.Store(d.Name, err.Error())
		// The primaries first: a resync that ends between the two
		// would clear the Crashed mark (finishResync reads the flag).
		n.smu.RLock()
		for _, p := range n.primaries {
			if p.Dir.Name == d.Name {
				p.DiskFailed()
			}
		}
		n.smu.RUnlock()
		if j < len(n.metas) {
			// On the failed disk this may fail too: the marker of this
			// run, left set, makes the next start count as a crash.
			if err := n.metas[j].Update(func(m *replica.Meta) { m.Crashed = true }); err != nil {
				n.log.Warn("marking the copy for a comparison at its next resync", "dir", d.Name, "err", err)
			}
		}
	}
}

// failedDisk says why directory name's filesystem failed ("": it did not;
// diskFailed).
func (n *Node) failedDisk(name string) string {
	why, _ := n.failedDisks.Load(name)
	s, _ := why.(string)
	return s
}
