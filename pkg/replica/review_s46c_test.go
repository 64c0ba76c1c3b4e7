package replica

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// TestS46cMarkOutlivesOwnerGiven: the mark is taken away only by a
// setattr that ADDS set-id bits. A create that asked for them whose own
// setattr never applies (its batch lost with the connection; the resync
// finds the peer holding the file and sends no create, only the setattr
// of the file's state then) keeps the mark through a setattr that gives
// the inode to a local user without the bits (on the primary, a chown to
// the user, which clears them). The user, owner now, writes their bytes;
// a later setattr of the primary (chown root, chmod u+s) finds the mark
// and makes the user's bytes set-uid root. TestSetidWithheldTwice's
// pattern, on a marked inode.
func TestS46cMarkOutlivesOwnerGiven(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "prog", Mode: 0o4755},
		wire.Op{Code: wire.OpWrite, Path: "prog", Data: []byte("#!/bin/true\n")},
	); err != nil {
		t.Fatal(err)
	}
	// The primary chowned it to the user (set-uid cleared by the chown).
	if err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o755, UID: s46Nobody, GID: s46Nobody, Mtime: 42, Atime: 42}); err != nil {
		t.Fatal(err)
	}
	// Refused since the fix (the inode has no write bit for others until
	// its setattr): the user's bytes, if the write got in, must not be
	// made set-uid.
	out, werr := s46TryAsUser(root, `printf '#!/bin/sh\nid\n' > prog`)
	t.Logf("the local user's write: %v %s", werr, out)
	// The primary's admin: chown root prog; chmod 4755 prog.
	err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o4755, UID: 0, GID: 0, Mtime: 43, Atime: 43})
	st := s46Lstat(t, filepath.Join(root, "prog"))
	b, _ := os.ReadFile(filepath.Join(root, "prog"))
	if st.Mode&unix.S_ISUID != 0 && string(b) == "#!/bin/sh\nid\n" {
		t.Fatalf("bytes the local user wrote as the file's owner are now uid %d mode %o: set-uid root (a mark left by a setattr that gave the owner without the bits; err %v)",
			st.Uid, st.Mode&0o7777, err)
	}
}

// TestS46cWritableMarkedCreate: OpCreate makes the marked inode root's
// with the create's mode less the set-id bits: 0777 for a 04777 program.
// Between the create and the setattr (the content may span batches) any
// local user writes into it; the setattr finds the mark and adds set-uid
// root. On the primary the same write clears the bit (the writer lacks
// CAP_FSETID); here the bit is added after it. A group-writable 04775 in
// a set-gid directory gives the same to the directory's group.
func TestS46cWritableMarkedCreate(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "prog", Mode: 0o4777},
		wire.Op{Code: wire.OpWrite, Path: "prog", Data: []byte("#!/bin/true\n")},
	); err != nil {
		t.Fatal(err)
	}
	// Refused since the fix (the inode has no write bit for others until
	// its setattr): the user's bytes, if the write got in, must not be
	// made set-uid.
	out, werr := s46TryAsUser(root, `printf '#!/bin/sh\nid\n' > prog`)
	t.Logf("the local user's write: %v %s", werr, out)
	err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o4777, UID: 0, GID: 0, Mtime: 43, Atime: 43})
	st := s46Lstat(t, filepath.Join(root, "prog"))
	b, _ := os.ReadFile(filepath.Join(root, "prog"))
	if st.Mode&unix.S_ISUID != 0 && string(b) == "#!/bin/sh\nid\n" {
		t.Fatalf("a local user's bytes, written into the root-owned 0777 inode made for a 04777 create, are now uid %d mode %o (err %v)",
			st.Uid, st.Mode&0o7777, err)
	}
}
