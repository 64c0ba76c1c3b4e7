package replica

import (
	"io/fs"
	"strings"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// fullSync makes the peer's tree equal to local (a pre-order scan with
// sums) given the peer's manifest: only blocks whose checksums differ are
// sent, entries the primary lacks are removed, hard links stay links.
func (b *builder) fullSync(local, peer []wire.Entry) error {
	pm := make(map[string]*wire.Entry, len(peer))
	for i := range peer {
		pm[peer[i].Path] = &peer[i]
	}
	localPaths := make(map[string]bool, len(local))
	for i := range local {
		localPaths[local[i].Path] = true
	}
	// Removals first, top-most only: a removed directory takes its subtree.
	var removed []string
	for i := range peer {
		p := peer[i].Path
		if p == "." || localPaths[p] || underAny(p, removed) {
			continue
		}
		if err := b.out.add(&wire.Op{Code: wire.OpRemove, Path: p}); err != nil {
			return err
		}
		removed = append(removed, p)
	}
	firstName := map[uint64]string{} // hard links: inode → first path sent
	for i := range local {
		l := &local[i]
		if l.Path == "." {
			continue
		}
		p := pm[l.Path]
		if p != nil && p.Mode.Type() != l.Mode.Type() {
			p = nil // create replaces whatever is there
		}
		if l.Mode.IsRegular() {
			if first, ok := firstName[l.Ino]; ok {
				if err := b.out.add(&wire.Op{Code: wire.OpLink, Path: first, Path2: l.Path}); err != nil {
					return err
				}
				continue
			}
			firstName[l.Ino] = l.Path
		}
		if err := b.syncEntry(l, p); err != nil {
			return err
		}
	}
	return nil
}

func underAny(p string, dirs []string) bool {
	for _, d := range dirs {
		if strings.HasPrefix(p, d+"/") {
			return true
		}
	}
	return false
}

func (b *builder) syncEntry(l, p *wire.Entry) error {
	perm := fstree.UnixPerm(l.Mode)
	changed := p == nil
	switch {
	case l.Mode.IsDir():
		if p == nil {
			if err := b.out.add(&wire.Op{Code: wire.OpMkdir, Path: l.Path, Mode: perm}); err != nil {
				return err
			}
		}
	case l.Mode&fs.ModeSymlink != 0:
		if p == nil || p.Target != l.Target {
			changed = true
			if err := b.out.add(&wire.Op{Code: wire.OpSymlink, Path: l.Path, Path2: l.Target}); err != nil {
				return err
			}
		}
	case l.Mode&(fs.ModeNamedPipe|fs.ModeSocket) != 0:
		if p == nil {
			mode := uint32(unix.S_IFIFO)
			if l.Mode&fs.ModeSocket != 0 {
				mode = unix.S_IFSOCK
			}
			if err := b.out.add(&wire.Op{Code: wire.OpMknod, Path: l.Path, Mode: mode | perm}); err != nil {
				return err
			}
		}
	case l.Mode.IsRegular():
		c, err := b.syncFile(l, p)
		if err != nil {
			return err
		}
		changed = changed || c
	default:
		b.log.Warn("not replicating device node", "path", l.Path)
		return nil
	}
	if !changed && p.Mode == l.Mode && p.UID == l.UID && p.GID == l.GID && (l.Mode.IsDir() || p.Mtime == l.Mtime) {
		return nil
	}
	return b.out.add(&wire.Op{Code: wire.OpSetattr, Path: l.Path, Mode: perm, UID: l.UID, GID: l.GID, Mtime: l.Mtime, Atime: l.Mtime})
}

// syncFile sends the blocks of l that differ from p (all of them when the
// peer has no such file), and the size.
func (b *builder) syncFile(l, p *wire.Entry) (bool, error) {
	if p == nil {
		if err := b.out.add(&wire.Op{Code: wire.OpCreate, Path: l.Path, Mode: fstree.UnixPerm(l.Mode)}); err != nil {
			return true, err
		}
	}
	f, err := fstree.OpenBeneath(b.root, l.Path, unix.O_RDONLY|unix.O_NOFOLLOW)
	var st unix.Stat_t
	if err == nil && (unix.Fstat(int(f.Fd()), &st) != nil || st.Ino != l.Ino) {
		f.Close()
		err = unix.ESTALE
	}
	if err != nil {
		// Renamed, replaced or removed since the scan. Records report
		// only what changed after capture started, not the content the
		// file already had: send it whole once the shadow knows where
		// it is (or nothing, if it is gone).
		b.retry(journal.File{Key: capture.InodeKey{Dev: b.dev, Ino: l.Ino}, Rescan: true}, l.Path+" moved during the full sync")
		return true, nil
	}
	defer f.Close()
	if p == nil {
		return true, b.sendWhole(l.Path, f, false)
	}
	changed := p.Size != l.Size
	if changed {
		if err := b.out.add(&wire.Op{Code: wire.OpTruncate, Path: l.Path, Off: l.Size}); err != nil {
			return true, err
		}
	}
	for i := range l.Sums {
		if i < len(p.Sums) && p.Sums[i] == l.Sums[i] {
			continue
		}
		changed = true
		off := uint64(i) * wire.BlockSize
		end := min(off+wire.BlockSize, l.Size)
		// A block of zeros beyond the peer's old size is already a hole.
		if i >= len(p.Sums) && l.Sums[i] == zeroSum(end-off) {
			continue
		}
		if err := b.ship(l.Path, f, journal.Span{Off: off, End: end}); err != nil {
			return true, err
		}
	}
	return changed, nil
}

var fullZeroSum = fstree.SumBlock(make([]byte, wire.BlockSize))

// zeroSum is the checksum of n zero bytes (n ≤ BlockSize).
func zeroSum(n uint64) wire.Sum {
	if n == wire.BlockSize {
		return fullZeroSum
	}
	return fstree.SumBlock(make([]byte, n))
}
