package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/duet-ha/duet/pkg/cluster"
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
			n.post(ctx, cluster.Event{Kind: cluster.EvDiskFailed, Why: fmt.Sprintf("directory %s (%s): %v", d.Name, d.Path, err)})
		}
	}
}
