package replica

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// outsideTree lays out, beside a replica root under top, what an escaping
// op would hurt: a file and a directory with a file in it, with owners
// and times of their own.
func outsideTree(t testing.TB, top string) string {
	t.Helper()
	outside := filepath.Join(top, "outside")
	for _, d := range []string{outside, filepath.Join(outside, "sdir")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, f := range []string{filepath.Join(outside, "sentinel"), filepath.Join(outside, "sdir", "inner")} {
		if err := os.WriteFile(f, []byte("keep"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	old := []unix.Timespec{{Sec: 1e9}, {Sec: 1e9}}
	for _, p := range []string{"sentinel", "sdir/inner", "sdir", "."} {
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, filepath.Join(outside, p), old, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			t.Fatal(err)
		}
	}
	return outside
}

// snapshotOutside describes every entry under top except the replica
// root's subtree (none if root is ""): type and mode, owner, size, mtime, ctime (which any
// chmod, chown or utimes moves), symlink target and content. Atimes are
// left out: reading the content moves them.
func snapshotOutside(t testing.TB, top, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(top, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if root != "" && p == root {
			return filepath.SkipDir
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		desc := fmt.Sprintf("mode %o owner %d:%d size %d mtime %d ctime %d", st.Mode, st.Uid, st.Gid, st.Size, st.Mtim.Nano(), st.Ctim.Nano())
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += " -> " + target
		case unix.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" sha256 %x", sha256.Sum256(b))
		}
		out[p] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkOutside fails t for every entry outside the root that changed,
// appeared or vanished since before.
func checkOutside(t testing.TB, before, after map[string]string) {
	t.Helper()
	var paths []string
	for p := range before {
		paths = append(paths, p)
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			paths = append(paths, p)
		}
	}
	sort.Strings(paths)
	for _, p := range paths {
		if before[p] != after[p] {
			t.Errorf("outside the replica root, %s changed: %q → %q", p, before[p], after[p])
		}
	}
}

// A local user of the secondary who can rename entries in a replicated
// directory swaps an entry the applier is working on with a symlink to a
// file or directory outside the root, over and over (renameat2
// RENAME_EXCHANGE, and a plain rename of a fresh symlink over it). No op
// of any kind may change anything outside the root: a chmod that followed
// the swapped-in link made the outside file set-uid and world-writable.
func TestApplierSymlinkSwapRace(t *testing.T) {
	top := t.TempDir()
	root := filepath.Join(top, "replica")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	outside := outsideTree(t, top)
	toFile, toDir := filepath.Join(outside, "sentinel"), filepath.Join(outside, "sdir")
	before := snapshotOutside(t, top, root)
	a, err := NewApplier(root)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()

	// Owners the ops set: others than the outside files' as root, the
	// test's own otherwise (a chown to them succeeds, so the chmod after
	// it runs).
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	if uid == 0 {
		uid, gid = 4242, 4243
	}
	attr := func(p string) wire.Op {
		return wire.Op{Code: wire.OpSetattr, Path: p, Mode: 0o4777, UID: uid, GID: gid, Mtime: 42, Atime: 42}
	}
	round := []wire.Op{
		{Code: wire.OpCreate, Path: "v", Mode: 0o644},
		{Code: wire.OpWrite, Path: "v", Data: []byte("pwned")},
		{Code: wire.OpTruncate, Path: "v", Off: 1},
		{Code: wire.OpPunch, Path: "v", Len: 1},
		attr("v"),
		{Code: wire.OpLink, Path: "v", Path2: "w"},
		attr("w"),
		{Code: wire.OpRename, Path: "v", Path2: "w"},
		{Code: wire.OpRename, Path: "w", Path2: "v"},
		attr("v"),
		{Code: wire.OpRemove, Path: "v"},
		{Code: wire.OpMkdir, Path: "v", Mode: 0o4777},
		{Code: wire.OpMkdir, Path: "v", Mode: 0o4777}, // an existing directory: chmod only
		attr("v"),
		{Code: wire.OpCreate, Path: "v/x", Mode: 0o644},
		{Code: wire.OpWrite, Path: "v/x", Data: []byte("pwned")},
		attr("v/x"),
		{Code: wire.OpMknod, Path: "v/p", Mode: unix.S_IFIFO | 0o666},
		{Code: wire.OpSymlink, Path: "v/s", Path2: toFile},
		{Code: wire.OpRename, Path: "v", Path2: "w"},
		{Code: wire.OpRemove, Path: "w"},
		{Code: wire.OpRemove, Path: "v"},
	}

	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(rfd)
	stop, swapped := make(chan struct{}), make(chan int)
	go func() {
		n := 0
		defer func() { swapped <- n }()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			// The symlinks to exchange "v" with are put back when an
			// exchange or an op took them away.
			for name, target := range map[string]string{"lf": toFile, "ld": toDir} {
				unix.Symlinkat(target, rfd, name)
			}
			var err error
			switch i % 5 {
			case 0, 1: // out and back in again
				err = unix.Renameat2(rfd, "v", rfd, "lf", unix.RENAME_EXCHANGE)
			case 2, 3:
				err = unix.Renameat2(rfd, "v", rfd, "ld", unix.RENAME_EXCHANGE)
			case 4:
				target := toFile
				if i%2 == 0 {
					target = toDir
				}
				unix.Unlinkat(rfd, "v.new", 0)
				if err = unix.Symlinkat(target, rfd, "v.new"); err == nil {
					err = unix.Renameat(rfd, "v.new", rfd, "v")
				}
			}
			if err == nil {
				n++
			}
		}
	}()

	const rounds = 400
	applied := map[wire.OpCode]int{}
	for range rounds {
		for i := range round {
			// Ops fail now and then, as the swaps make them: what counts
			// is what they did outside.
			if a.Apply(&round[i]) == nil {
				applied[round[i].Code]++
			}
		}
	}
	close(stop)
	t.Logf("%d rounds of %d ops against %d swaps; applied: %v", rounds, len(round), <-swapped, applied)
	checkOutside(t, before, snapshotOutside(t, top, root))
	for _, op := range round {
		if applied[op.Code] == 0 {
			t.Errorf("no %s applied: the race tested nothing of it", op.Code)
		}
	}
}

// A filesystem mounted inside the replica root is not crossed: neither
// an op on the mount point (a recursive remove would empty what is
// mounted there) nor on a path beneath it.
func TestApplierStopsAtMountPoints(t *testing.T) {
	loopfs.RequireRoot(t)
	root := t.TempDir()
	mnt := filepath.Join(root, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	loopfs.Tmpfs(t, mnt)
	if err := os.MkdirAll(filepath.Join(mnt, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"f", "sub/g"} {
		if err := os.WriteFile(filepath.Join(mnt, f), []byte("keep"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "plain"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	before := snapshotOutside(t, mnt, "")
	a, err := NewApplier(root)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	ops := []wire.Op{
		{Code: wire.OpSetattr, Path: "mnt", Mode: 0o777, UID: 4242},
		{Code: wire.OpMkdir, Path: "mnt", Mode: 0o777},
		{Code: wire.OpRemove, Path: "mnt"},
		{Code: wire.OpCreate, Path: "mnt", Mode: 0o644},
		{Code: wire.OpRename, Path: "mnt", Path2: "moved"},
		{Code: wire.OpRename, Path: "plain", Path2: "mnt"},
		{Code: wire.OpLink, Path: "plain", Path2: "mnt"},
		{Code: wire.OpSymlink, Path: "mnt", Path2: "plain"},
		{Code: wire.OpMknod, Path: "mnt", Mode: unix.S_IFIFO | 0o644},
		{Code: wire.OpSetattr, Path: "mnt/f", Mode: 0o4777},
		{Code: wire.OpWrite, Path: "mnt/f", Data: []byte("pwned")},
		{Code: wire.OpTruncate, Path: "mnt/f"},
		{Code: wire.OpRemove, Path: "mnt/f"},
		{Code: wire.OpRemove, Path: "mnt/sub"},
		{Code: wire.OpRename, Path: "mnt/f", Path2: "stolen"},
		{Code: wire.OpLink, Path: "mnt/f", Path2: "linked"},
		{Code: wire.OpCreate, Path: "mnt/new", Mode: 0o644},
		{Code: wire.OpMkdir, Path: "mnt/sub/d", Mode: 0o755},
		{Code: wire.OpSymlink, Path: "mnt/s", Path2: "/"},
	}
	for i := range ops {
		err := a.Apply(&ops[i])
		if !errors.Is(err, unix.EXDEV) && !errors.Is(err, unix.EBUSY) {
			t.Errorf("%s %q: %v, want a refusal to cross the mount point", ops[i].Code, ops[i].Path, err)
		}
	}
	checkOutside(t, before, snapshotOutside(t, mnt, ""))
}

// Before fchmodat2 (Linux 6.6), the mode is set through the handle's
// /proc/self/fd link: that changes the handle's inode, and for a symlink
// neither the link nor its target.
func TestChmodProc(t *testing.T) {
	dir := t.TempDir()
	file, link := filepath.Join(dir, "f"), filepath.Join(dir, "l")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("f", link); err != nil {
		t.Fatal(err)
	}
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for _, c := range []struct {
		name string
		want error
	}{{"f", nil}, {"l", unix.EOPNOTSUPP}} {
		h, _, err := entryAt(d, c.name)
		if err != nil {
			t.Fatal(err)
		}
		if err := chmodProc(h, 0o4700); !errors.Is(err, c.want) {
			t.Errorf("chmodProc of %s: %v, want %v", c.name, err, c.want)
		}
		h.Close()
	}
	if st, err := os.Stat(file); err != nil || st.Mode() != fs.ModeSetuid|0o700 {
		t.Fatalf("f after chmodProc 04700 of f and of a symlink to it: %v (%v), want -rwx------ set-uid", st.Mode(), err)
	}
}
