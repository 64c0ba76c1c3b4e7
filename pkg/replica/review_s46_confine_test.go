package replica

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// s46Nobody is the unprivileged local user of the secondary.
const s46Nobody = 65534

// s46Setup makes, under a temporary directory every user may traverse, a
// replicated directory of mode 0777 (as the nfs-subdir provisioner makes
// them) and returns it with its parent.
func s46Setup(t *testing.T) (top, root string) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("needs root: the daemon's credentials, and setuid to act as a local user")
	}
	top = t.TempDir()
	for d := top; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	root = filepath.Join(top, "vol")
	if err := os.Mkdir(root, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(root, 0o777); err != nil {
		t.Fatal(err)
	}
	return top, root
}

// s46AsUser runs a shell script as the unprivileged local user, in dir.
func s46AsUser(t *testing.T, dir, script string) {
	t.Helper()
	if out, err := s46TryAsUser(dir, script); err != nil {
		t.Fatalf("as uid %d: %s: %v\n%s", s46Nobody, script, err, out)
	}
}

// s46TryAsUser runs a shell script as the unprivileged local user, in
// dir, and returns its output and error.
func s46TryAsUser(dir, script string) ([]byte, error) {
	return s46UserShell(dir, script).CombinedOutput()
}

// s46UserShell is a shell running script as the unprivileged local user,
// in dir.
func s46UserShell(dir, script string) *exec.Cmd {
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: s46Nobody, Gid: s46Nobody}}
	return cmd
}

// s46Applier is an applier of root, closed when the test ends.
func s46Applier(t *testing.T, root string) *Applier {
	t.Helper()
	a, err := NewApplier(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	return a
}

func s46Apply(t *testing.T, a *Applier, ops ...wire.Op) error {
	t.Helper()
	for i := range ops {
		if err := a.Apply(&ops[i]); err != nil {
			return err
		}
	}
	return a.Sync()
}

func s46Lstat(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// A local user replaces a root-owned program of the replica with a file
// of their own (a rename in the 0777 directory, no sticky bit). The
// primary then sets the program set-uid (chmod u+s, or a touch of a
// program that already is: a setattr by name). The applier chowns the
// user's inode to root and chmods it 04755: the user's bytes become a
// set-uid-root program on the secondary.
func TestReviewS46SetattrGivesUserFileSetuidRoot(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "prog", Mode: 0o755},
		wire.Op{Code: wire.OpWrite, Path: "prog", Data: []byte("#!/bin/true\n")},
		wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o755, UID: 0, GID: 0, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}

	s46AsUser(t, root, `printf 'user payload\n' > .p && chmod 755 .p && mv -f .p prog`)
	planted := s46Lstat(t, filepath.Join(root, "prog"))
	if planted.Uid != s46Nobody {
		t.Fatalf("the plant failed: prog is owned by %d", planted.Uid)
	}

	err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o4755, UID: 0, GID: 0, Mtime: 43, Atime: 43})
	t.Logf("setattr: %v", err)
	st := s46Lstat(t, filepath.Join(root, "prog"))
	b, _ := os.ReadFile(filepath.Join(root, "prog"))
	if st.Ino == planted.Ino && st.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
		t.Errorf("the local user's file (content %q, planted as uid %d) is now owned by uid %d with mode %o: a set-uid program of the user's making",
			b, s46Nobody, st.Uid, st.Mode&0o7777)
	}
	if err != nil {
		t.Errorf("the setattr failed: %v", err)
	}
}

// A resync (or a pass that finds a new file already chmodded) ships a
// set-uid program owned by uid 1000 as OpCreate with mode 04755, its
// content, and its owner in a setattr after. The applier creates the
// file as root with the set-uid bit at once: until the setattr the
// replica holds the primary's program set-uid ROOT. A batch ends between
// the content and the setattr (the content spans batches, or the
// setattr comes in a later pass); the local user renames the file in the
// 0777 directory, the setattr by name fails (ENOENT), and the user keeps
// a set-uid-root copy of a program meant to run as uid 1000.
func TestReviewS46CreateIsSetuidRootBeforeItsOwner(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "su1000", Mode: 0o4755},
		wire.Op{Code: wire.OpWrite, Path: "su1000", Data: []byte("#!/bin/sh\nexec /bin/sh -p\n")},
	); err != nil {
		t.Fatal(err)
	}
	st := s46Lstat(t, filepath.Join(root, "su1000"))
	if st.Uid == 0 && st.Mode&unix.S_ISUID != 0 {
		t.Errorf("between batches, before its owner (uid 1000) is applied, su1000 is owned by uid %d with mode %o", st.Uid, st.Mode&0o7777)
	}

	s46AsUser(t, root, `mv su1000 mine`)
	err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "su1000", Mode: 0o4755, UID: 1000, GID: 1000, Mtime: 42, Atime: 42})
	t.Logf("setattr after the user's rename: %v", err)
	st = s46Lstat(t, filepath.Join(root, "mine"))
	if st.Uid == 0 && st.Mode&unix.S_ISUID != 0 {
		t.Errorf("the local user keeps %s/mine owned by uid %d with mode %o (the primary's owner, 1000, never applied)", root, st.Uid, st.Mode&0o7777)
	}
}

// fs.protected_hardlinks lets a user hard-link a file they may read and
// write though they do not own it. Linked into the replica over a name
// the primary then chowns and chmods, the outside file is given away
// (owner 1000) and its mode changed: the applier changes a file outside
// the root, beyond what its maker could do (DESIGN §4 counts the hard
// link as "not covered" on the ground that the maker may write it).
func TestReviewS46HardLinkOutsideGivenAway(t *testing.T) {
	top, root := s46Setup(t)
	outside := filepath.Join(top, "outside")
	if err := os.WriteFile(outside, []byte("shared\n"), 0o666); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(outside, 0o666); err != nil { // root:root, writable by all, owned by none of them
		t.Fatal(err)
	}
	before := s46Lstat(t, outside)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644},
		wire.Op{Code: wire.OpSetattr, Path: "f", Mode: 0o644, UID: 1000, GID: 1000, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}
	s46AsUser(t, root, `ln -f `+outside+` f`)
	err := s46Apply(t, a,
		wire.Op{Code: wire.OpSetattr, Path: "f", Mode: 0o4755, UID: 1000, GID: 1000, Mtime: 43, Atime: 43},
		wire.Op{Code: wire.OpTruncate, Path: "f", Off: 0},
	)
	t.Logf("apply: %v", err)
	after := s46Lstat(t, outside)
	if after.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
		t.Errorf("outside the root, %s (root's, writable by all) became set-id: owner %d:%d mode %o",
			outside, after.Uid, after.Gid, after.Mode&0o7777)
	}
	// Known open (docs/DESIGN.md §4, "Not covered"): its owner, mode and
	// size are still set as the primary's file's.
	if os.Getenv("DUET_KNOWN_OPEN") != "" && (after.Uid != before.Uid || after.Gid != before.Gid || after.Mode != before.Mode || after.Size != before.Size) {
		t.Errorf("outside the root, %s went from owner %d:%d mode %o size %d to owner %d:%d mode %o size %d",
			outside, before.Uid, before.Gid, before.Mode&0o7777, before.Size, after.Uid, after.Gid, after.Mode&0o7777, after.Size)
	}
}

// The primary's file "db" (uid 1000, mode 0600) lives in a 0777
// directory. A local user of the secondary renames a file of their own
// over "db" and keeps it open for reading. Every later write the primary
// ships for "db" is applied by name, into the user's inode (on the
// primary, the application's open descriptor never sees the rename); the
// setattr after it hands the inode to uid 1000 mode 0600, but the
// user's descriptor reads on: the primary's private data leaks to the
// local user (a resync that finds the content different ships it all).
//
// Known open (docs/DESIGN.md §8, "Open, from the reviews of the forty-sixth
// session"): the applier cannot tell an inode a local user renamed over a
// name from the one it wrote there.
func TestReviewS46WriteIntoUserPlantedInodeLeaks(t *testing.T) {
	if os.Getenv("DUET_KNOWN_OPEN") == "" {
		t.Skip("known open: writes by name go into an inode a local user of the replica put there (DESIGN §8); DUET_KNOWN_OPEN=1 runs it")
	}
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "db", Mode: 0o600},
		wire.Op{Code: wire.OpWrite, Path: "db", Data: []byte("old private\n")},
		wire.Op{Code: wire.OpSetattr, Path: "db", Mode: 0o600, UID: 1000, GID: 1000, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}
	cmd := s46UserShell(root, `: > .p && mv -f .p db && exec 3< db && echo ready && read x && cat <&3`)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 6)
	if _, err := io.ReadFull(out, buf); err != nil || string(buf) != "ready\n" {
		t.Fatalf("the local user's process: %q %v", buf, err)
	}
	err = s46Apply(t, a,
		wire.Op{Code: wire.OpWrite, Path: "db", Data: []byte("SECRET of uid 1000\n")},
		wire.Op{Code: wire.OpSetattr, Path: "db", Mode: 0o600, UID: 1000, GID: 1000, Mtime: 43, Atime: 43},
	)
	t.Logf("apply: %v", err)
	in.Write([]byte("\n"))
	in.Close()
	got, _ := io.ReadAll(out)
	cmd.Wait()
	st := s46Lstat(t, filepath.Join(root, "db"))
	if bytes.Contains(got, []byte("SECRET")) {
		t.Errorf("uid %d read %q of the primary's uid-1000 mode-0600 file (now owner %d mode %o) through a descriptor of the inode it planted",
			s46Nobody, got, st.Uid, st.Mode&0o7777)
	}
}

// The set-id bits the primary gives its files reach the replica where
// the applier made the inode for them: a file created set-uid for another
// user, its bits kept on later setattrs (a new connection's applier);
// withheld where it did not: a set-gid added later to a file it holds, to
// a file others may write.
func TestSetidReplicatedWhereTheApplierMadeTheFile(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "su", Mode: 0o4755},
		wire.Op{Code: wire.OpWrite, Path: "su", Data: []byte("#!/bin/true\n")},
		wire.Op{Code: wire.OpSetattr, Path: "su", Mode: 0o4755, UID: 1000, GID: 1000, Mtime: 42, Atime: 42},
		wire.Op{Code: wire.OpCreate, Path: "later", Mode: 0o755},
		wire.Op{Code: wire.OpSetattr, Path: "later", Mode: 0o755, UID: 1000, GID: 1000, Mtime: 42, Atime: 42},
		wire.Op{Code: wire.OpCreate, Path: "open", Mode: 0o666},
		wire.Op{Code: wire.OpSetattr, Path: "open", Mode: 0o666, UID: 1000, GID: 1000, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}
	// A later batch: another applier (a new connection).
	b := s46Applier(t, root)
	if err := s46Apply(t, b,
		wire.Op{Code: wire.OpSetattr, Path: "su", Mode: 0o4755, UID: 1000, GID: 1000, Mtime: 43, Atime: 43},
		wire.Op{Code: wire.OpSetattr, Path: "later", Mode: 0o2755, UID: 1000, GID: 1000, Mtime: 43, Atime: 43},
		wire.Op{Code: wire.OpSetattr, Path: "open", Mode: 0o4755, UID: 1000, GID: 1000, Mtime: 43, Atime: 43},
	); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		mode uint32
	}{{"su", 0o4755}, {"later", 0o755}, {"open", 0o755}} {
		st := s46Lstat(t, filepath.Join(root, c.name))
		if st.Mode&0o7777 != c.mode || st.Uid != 1000 || st.Gid != 1000 {
			t.Errorf("%s: owner %d:%d mode %o, want 1000:1000 %o", c.name, st.Uid, st.Gid, st.Mode&0o7777, c.mode)
		}
	}
}

// A local user's file renamed over a root program: the primary's setattr
// that keeps the program as it was (root's, 0755) gives the user's inode
// root as its owner; the next, which adds the set-uid bit, then finds an
// inode that looks like the applier's.
func TestSetidWithheldTwice(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "prog", Mode: 0o755},
		wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o755, UID: 0, GID: 0, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}
	s46AsUser(t, root, `printf 'user payload\n' > .p && chmod 755 .p && mv -f .p prog`)
	planted := s46Lstat(t, filepath.Join(root, "prog"))
	for i, mode := range []uint32{0o755, 0o4755, 0o4755} {
		if err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: mode, UID: 0, GID: 0, Mtime: int64(43 + i), Atime: 43}); err != nil {
			t.Fatal(err)
		}
		if st := s46Lstat(t, filepath.Join(root, "prog")); st.Ino == planted.Ino && st.Mode&(unix.S_ISUID|unix.S_ISGID) != 0 {
			t.Fatalf("after setattr %d (mode %o): the user's file is owned by %d with mode %o", i, mode, st.Uid, st.Mode&0o7777)
		}
	}
}

// A set-id file the primary holds writable by all (04777) is made without
// group and other write bits until its setattr: a local user cannot write
// their bytes into the inode the applier will make set-id.
func TestSetidCreateNotWritableByOthersUntilItsSetattr(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a, wire.Op{Code: wire.OpCreate, Path: "open", Mode: 0o4777}); err != nil {
		t.Fatal(err)
	}
	if out, err := s46TryAsUser(root, `printf 'user payload\n' > open`); err == nil {
		t.Fatalf("a local user wrote into the file made for set-id bits before its setattr (%s)", out)
	}
	if err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "open", Mode: 0o4777, UID: 1000, GID: 1000, Mtime: 42, Atime: 42}); err != nil {
		t.Fatal(err)
	}
	if st := s46Lstat(t, filepath.Join(root, "open")); st.Mode&0o7777 != 0o4777 || st.Uid != 1000 {
		t.Errorf("after its setattr: owner %d mode %o, want 1000 and 4777", st.Uid, st.Mode&0o7777)
	}
}
