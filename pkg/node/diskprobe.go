package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/replica"
	"golang.org/x/sys/unix"
)

// diskProbeInterval is how often a serving node checks the filesystems of
// its replicated directories (diskProbe).
const diskProbeInterval = time.Second

// diskFailedRepeat is how often a disk that still fails is reported again
// to the cluster loop (which keeps the role while no peer is in sync).
const diskFailedRepeat = 10 * time.Second

// diskProbe checks that the filesystem under dir still takes writes: not
// read-only (ext4 remounts so when its journal aborts on a failed write,
// btrfs turns so on a failed transaction) and not shut down (XFS on a
// failed metadata write; FS_IOC_SHUTDOWN), which fsync of the directory
// reports with EIO on XFS and ext4. It writes nothing into the tree.
func diskProbe(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Statfs_t
	if err := unix.Fstatfs(fd, &st); err != nil {
		return fmt.Errorf("statfs: %w", err)
	}
	if st.Flags&unix.ST_RDONLY != 0 {
		return errors.New("the filesystem is read-only (remounted after an error?)")
	}
	if err := unix.Fsync(fd); err != nil {
		return fmt.Errorf("fsync: %w", err)
	}
	return nil
}

// watchDisks probes, while the node serves, the filesystem of every
// replicated directory (one per filesystem) every diskProbeInterval, and
// tells the cluster loop when one fails (EvDiskFailed): the node gives the
// role to a peer in sync. A primary whose disk had died went on serving
// from it, holding the VIP, unless a service noticed and failed (a
// service that only reads, or NFS clients that wait, does not). A probe
// that hangs (a disk that no longer answers) is waited for, not counted:
// a slow flush under load is not a failure, and a second probe is not
// started meanwhile.
func (n *Node) watchDisks(ctx context.Context) {
	seen := map[uint64]bool{}
	var dirs []int
	for i := range n.dirs {
		if i < len(n.devs) && seen[n.devs[i]] {
			continue
		}
		if i < len(n.devs) {
			seen[n.devs[i]] = true
		}
		dirs = append(dirs, i)
	}
	t := time.NewTicker(diskProbeInterval)
	defer t.Stop()
	var reported time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, i := range dirs {
			d := n.dirs[i]
			res := make(chan error, 1)
			go func() { res <- diskProbe(d.Path) }()
			var err error
			select {
			case err = <-res:
			case <-ctx.Done():
				return
			}
			if err == nil || time.Since(reported) < diskFailedRepeat {
				continue
			}
			reported = time.Now()
			n.log.Error("the disk under a replicated directory fails: the role goes to the peer if it is in sync",
				"dir", d.Name, "path", d.Path, "err", err)
			n.diskFailed(i, err)
			n.post(ctx, cluster.Event{Kind: cluster.EvDiskFailed, Why: fmt.Sprintf("directory %s (%s): %v", d.Name, d.Path, err)})
		}
	}
}

// diskFailed records that the filesystem of directory i failed, for it
// and every directory on the same device: their copies count as after a
// crash (Meta.Crashed) until a resync completes, and leaving the role
// records no handover for them (failedDisk). What the filesystem held
// unwritten is lost with it, though the peer may have it: a handover
// recorded after the failure (its syncfs finds nothing to write on a
// filesystem turned read-only) claimed the copy consistent, and the next
// resync, from the bitmap, left the difference in place.
func (n *Node) diskFailed(i int, err error) {
	for j, d := range n.dirs {
		if j != i && (j >= len(n.devs) || i >= len(n.devs) || n.devs[j] != n.devs[i]) {
			continue
		}
		n.failedDisks.Store(d.Name, err.Error())
		if j < len(n.metas) {
			// On the failed disk this may fail too: the marker of this
			// run, left set, makes the next start count as a crash.
			if err := n.metas[j].Update(func(m *replica.Meta) { m.Crashed = true }); err != nil {
				n.log.Warn("marking the copy for a comparison at its next resync", "dir", d.Name, "err", err)
			}
		}
	}
}

// failedDisk says why directory name's filesystem failed in this term
// ("": it did not; diskFailed).
func (n *Node) failedDisk(name string) string {
	why, _ := n.failedDisks.Load(name)
	s, _ := why.(string)
	return s
}
