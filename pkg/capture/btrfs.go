package capture

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BtrfsSuperblock returns the device of the btrfs filesystem path is on,
// as its superblock (s_dev) and /proc/self/mountinfo name it, in stat(2)'s
// encoding: stat(2) reports each subvolume's own device instead, which is
// what Options.Devices holds and records carry. Options.Btrfs wants both.
func BtrfsSuperblock(path string) (uint64, error) {
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, 0, unix.STATX_MNT_ID, &stx); err != nil {
		return 0, fmt.Errorf("statx %s: %w", path, err)
	}
	if stx.Mask&unix.STATX_MNT_ID == 0 {
		return 0, fmt.Errorf("statx %s: no mount ID (kernel older than 5.8)", path)
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	id := strconv.FormatUint(stx.Mnt_id, 10)
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		// "36 35 98:0 /mnt1 /mnt2 rw ...": mount ID, parent ID, major:minor.
		fields := strings.Fields(sc.Text())
		if len(fields) < 3 || fields[0] != id {
			continue
		}
		maj, min, ok := strings.Cut(fields[2], ":")
		ma, err1 := strconv.ParseUint(maj, 10, 32)
		mi, err2 := strconv.ParseUint(min, 10, 32)
		if !ok || err1 != nil || err2 != nil {
			return 0, fmt.Errorf("mountinfo: mount %s has device %q", id, fields[2])
		}
		return unix.Mkdev(uint32(ma), uint32(mi)), nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("reading mountinfo: %w", err)
	}
	return 0, fmt.Errorf("mountinfo: no mount %s (the mount of %s)", id, path)
}

// BtrfsSubvolume is a subvolume (or snapshot) found inside a directory.
type BtrfsSubvolume struct {
	ID  uint64 // its tree ID, as btrfs subvolume list shows it
	Dir string // the directory holding it, relative to the one searched
}

// btrfs ioctls (include/uapi/linux/btrfs.h): _IOWR(0x94, nr, 4096 bytes).
const (
	btrfsIocInoLookup        = 0xd0009412 // nr 18, btrfs_ioctl_ino_lookup_args
	btrfsIocGetSubvolRootref = 0xd000943d // nr 61, btrfs_ioctl_get_subvol_rootref_args
)

type btrfsInoLookupArgs struct {
	TreeID   uint64
	ObjectID uint64
	Name     [4080]byte
}

type btrfsRootref struct {
	TreeID uint64
	DirID  uint64
}

type btrfsRootrefArgs struct {
	MinTreeID uint64
	Rootref   [255]btrfsRootref
	NumItems  uint8
	_         [7]uint8
}

// BtrfsSubvolumesInside lists the subvolumes whose root is inside
// directory dir, on the subvolume dir is on (those nested in them are
// inside too). Capture follows one subvolume per directory: another has
// its own device and its own inode numbers. Needs CAP_SYS_ADMIN.
func BtrfsSubvolumesInside(dir string) ([]BtrfsSubvolume, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return nil, fmt.Errorf("stat %s: %w", dir, err)
	}
	// Paths below the subvolume's root: "a/b/" for a directory, "" for
	// the root itself.
	lookup := func(ino uint64) (string, error) {
		a := btrfsInoLookupArgs{ObjectID: ino}
		if err := ioctlPtr(f, btrfsIocInoLookup, unsafe.Pointer(&a)); err != nil {
			return "", fmt.Errorf("btrfs INO_LOOKUP %d in %s: %w", ino, dir, err)
		}
		n := bytes.IndexByte(a.Name[:], 0)
		if n < 0 {
			n = len(a.Name)
		}
		return string(a.Name[:n]), nil
	}
	self, err := lookup(st.Ino)
	if err != nil {
		return nil, err
	}
	var out []BtrfsSubvolume
	var a btrfsRootrefArgs
	for {
		err := ioctlPtr(f, btrfsIocGetSubvolRootref, unsafe.Pointer(&a))
		if err != nil && !errors.Is(err, unix.EOVERFLOW) {
			return nil, fmt.Errorf("btrfs GET_SUBVOL_ROOTREF in %s: %w", dir, err)
		}
		for _, r := range a.Rootref[:a.NumItems] {
			p, lerr := lookup(r.DirID)
			if lerr != nil {
				return nil, lerr
			}
			if rest, inside := strings.CutPrefix(p, self); inside {
				out = append(out, BtrfsSubvolume{ID: r.TreeID, Dir: "./" + rest})
			}
		}
		if err == nil {
			return out, nil
		}
		// EOVERFLOW: more than one buffer; MinTreeID says where to go on.
	}
}

func ioctlPtr(f *os.File, req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, f.Fd(), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}
