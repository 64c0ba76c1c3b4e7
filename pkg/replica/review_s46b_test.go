package replica

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// TestS46bPassMarkClearsRequeuedBeyondEOF: holdKept re-marks only what the
// journal holds at Take. Bytes beyond EOF that the pass requeues
// (requeueOnly: beyondEOF++, blocked stays 0) go back into the journal
// AFTER holdKept, with marks counted before the pass's mark, and the pass
// is still covered (coverPass: addPass(mark)). Once its batch is durable
// the bitmap forgets them while only the journal holds them; a clean stop
// before the next pass saves a bitmap without them.
func TestS46bPassMarkClearsRequeuedBeyondEOF(t *testing.T) {
	p := unconnectedPrimary(t)
	ino := s46File(t, p, "log")
	bitmap := s46Term(t, p)
	// An append of page 2 is reported (write_end) before the size moved.
	p.Record(&capture.Record{Seq: 1, Kind: capture.KindData, Ino: ino, Pos: 8192, Len: 4096}, time.Now())
	p.mu.Lock()
	files, mark := p.takePass(time.Now())
	if len(files) != 1 {
		p.mu.Unlock()
		t.Fatalf("took %d files", len(files))
	}
	// The builder finds the bytes beyond EOF: requeueOnly (beyondEOF).
	requeue := files
	p.requeue(requeue)
	p.out.next = 2
	p.coverPass(mark, files, requeue, 0, 1, false, time.Now())
	p.out.acked, p.out.durable = 1, 1
	p.clearDirty(true)
	p.mu.Unlock()
	// The write lands (size 12288); then a chmod (KindAttr).
	if err := os.WriteFile(filepath.Join(p.Dir.Path, "log"), make([]byte, 12288), 0o644); err != nil {
		t.Fatal(err)
	}
	p.Record(&capture.Record{Seq: 2, Kind: capture.KindAttr, Ino: ino}, time.Now())
	p.mu.Lock()
	inJournal := p.j.Pending()
	p.mu.Unlock()
	if err := p.SaveDirty(); err != nil {
		t.Fatal(err)
	}
	d, _, err := loadDirty(bitmap)
	if err != nil {
		t.Fatal(err)
	}
	l := wire.Entry{Path: "log", Ino: ino, Mode: 0o644, Size: 12288}
	pe := wire.Entry{Path: "log", Ino: ino, Mode: 0o644, Size: 8192}
	spans, whole := fileSpans(&l, &pe, &treeSync{dirty: d})
	covered := whole
	for _, s := range spans {
		if s.Off <= 8192 && s.End >= 12288 {
			covered = true
		}
	}
	if !covered {
		t.Fatalf("journal held %d file(s) (the requeued bytes beyond EOF) when the term stopped; the saved bitmap "+
			"(attr only %v) makes the next resync send %v whole=%v: page 2 [8192,12288) never reaches the peer", inJournal, d.attrOnly(ino), spans, whole)
	}
}

// TestS46bMadeInodeNumberReused: the first version kept the inodes it
// made for set-id bits in Applier.made, keyed by (dev, ino), and never
// forgot one unlinked before its setattr. The inode
// number is reused (ext4 allocates the lowest free one) by a local user's
// file, which the user renames over a set-uid program's name in a
// directory they may write; the primary's next setattr of that program
// finds the user's inode in made and gives it set-uid root.
func TestS46bMadeInodeNumberReused(t *testing.T) {
	_, root := s46Setup(t)
	a := s46Applier(t, root)
	// A legit set-uid-root program, already replicated.
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "tool", Mode: 0o4755},
		wire.Op{Code: wire.OpWrite, Path: "tool", Data: []byte("#!/bin/true\n")},
		wire.Op{Code: wire.OpSetattr, Path: "tool", Mode: 0o4755, UID: 0, GID: 0, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}
	// The primary makes another set-uid program and removes it before its
	// setattr (a build's temporary, an installer's rename-away).
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "tmp.bin", Mode: 0o4755},
		wire.Op{Code: wire.OpWrite, Path: "tmp.bin", Data: []byte("x")},
	); err != nil {
		t.Fatal(err)
	}
	freed := s46Lstat(t, filepath.Join(root, "tmp.bin")).Ino
	if err := s46Apply(t, a, wire.Op{Code: wire.OpRemove, Path: "tmp.bin"}); err != nil {
		t.Fatal(err)
	}
	// The local user makes files until one gets the freed number.
	s46AsUser(t, root, fmt.Sprintf(`i=0; while [ $i -lt 3000 ]; do i=$((i+1)); printf 'user payload\n' > .u$i; `+
		`if [ "$(stat -c %%i .u$i)" = %d ]; then chmod 755 .u$i; mv -f .u$i tool; break; fi; done; rm -f .u*`, freed))
	planted := s46Lstat(t, filepath.Join(root, "tool"))
	if planted.Uid != s46Nobody {
		t.Skipf("inode %d not reused within 3000 creates (tool ino %d uid %d)", freed, planted.Ino, planted.Uid)
	}
	// The primary touches its set-uid program: a setattr by name.
	err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "tool", Mode: 0o4755, UID: 0, GID: 0, Mtime: 43, Atime: 43})
	st := s46Lstat(t, filepath.Join(root, "tool"))
	b, _ := os.ReadFile(filepath.Join(root, "tool"))
	if st.Ino == planted.Ino && st.Mode&unix.S_ISUID != 0 {
		t.Fatalf("the local user's file (ino %d, content %q) is now uid %d mode %o: set-uid root of the user's making (setattr err %v)",
			st.Ino, b, st.Uid, st.Mode&0o7777, err)
	}
}

// TestS46bSetidLostAcrossApplier: made lives in one Applier (one
// connection). A set-uid program of uid 1000 whose create reached the
// secondary in one session, and its setattr (the owner) in the next
// (reconnect, daemon restart with the session resumed, the content
// spanning batches), gets its setattr's set-id bits withheld: the inode
// is root's (the daemon made it) and the setattr changes the owner. The
// primary considers it shipped; the replica keeps it without set-uid.
func TestS46bSetidLostAcrossApplier(t *testing.T) {
	_, root := s46Setup(t)
	a, err := NewApplier(root)
	if err != nil {
		t.Fatal(err)
	}
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "prog", Mode: 0o4755},
		wire.Op{Code: wire.OpWrite, Path: "prog", Data: []byte("#!/bin/true\n")},
	); err != nil {
		t.Fatal(err)
	}
	a.Close()
	a2 := s46Applier(t, root)
	var warned []string
	a2.Warn = func(msg string, args ...any) { warned = append(warned, msg) }
	if err := s46Apply(t, a2, wire.Op{Code: wire.OpSetattr, Path: "prog", Mode: 0o4755, UID: 1000, GID: 1000, Mtime: 42, Atime: 42}); err != nil {
		t.Fatal(err)
	}
	st := s46Lstat(t, filepath.Join(root, "prog"))
	if st.Mode&0o7777 != 0o4755 {
		t.Fatalf("the primary's 04755 uid 1000 program is %o uid %d on the replica after a reconnect between its create and its setattr (warned %q)",
			st.Mode&0o7777, st.Uid, strings.Join(warned, "; "))
	}
}

// TestS46bBusyFileMarksNeverClear: hold re-touches EVERY mark of a held
// inode, the chunks the same pass took and shipped included. A file with
// an operation in progress at every Take (a database's O_DIRECT writes,
// one always in flight) keeps every chunk ever written marked for as long
// as the load lasts, though each was shipped in a batch the peer made
// durable: a resync after a short disconnect re-sends all of them.
func TestS46bBusyFileMarksNeverClear(t *testing.T) {
	p := unconnectedPrimary(t)
	const ino = 4242
	seq := uint64(1)
	p.Record(&capture.Record{Seq: seq, Kind: capture.KindData, Ino: ino, Pos: 0, Len: 4096}, time.Now())
	var b uint64 = 1
	for i := uint64(1); i <= 5; i++ {
		seq++
		p.Record(&capture.Record{Seq: seq, Kind: capture.KindAttr, Ino: ino}, time.Now()) // the op before ends
		seq++
		p.Record(&capture.Record{Seq: seq, Kind: capture.KindPreop, Ino: ino, Pos: i * 4096, Len: 4096}, time.Now()) // the next begins
		p.mu.Lock()
		files, mark := p.takePass(time.Now())
		p.out.next = b + 1
		p.coverPass(mark, files, nil, 0, 0, false, time.Now())
		p.out.acked, p.out.durable = b, b
		p.clearDirty(true)
		b++
		p.mu.Unlock()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if f := p.dirty.files[ino]; f != nil {
		if _, ok := f.chunks[0]; ok {
			t.Fatalf("page 0, shipped in pass 1 whose batch the peer made durable 5 passes ago, is still marked (file marks %d chunks): "+
				"a file with an operation in flight at every pass never has its marks cleared", len(f.chunks))
		}
	}
}

// TestS46bSetgidDirGivesUserFileForeignGroup: the keep-owner rule trusts
// an inode whose owner AND group already match the setattr's. A local
// user's file made in a set-gid directory gets that directory's group, a
// group the user is not in (the kernel would not let them chmod g+s it).
// Renamed over a program the primary holds as user:group 02755, the
// setattr finds owner and group kept, one name, no write bit for others:
// set-gid to the foreign group on the user's bytes.
func TestS46bSetgidDirGivesUserFileForeignGroup(t *testing.T) {
	_, root := s46Setup(t)
	const staff = 4321 // a group uid 65534 is not in
	sg := filepath.Join(root, "team")
	if err := os.Mkdir(sg, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(sg, 0, staff); err != nil {
		t.Fatal(err)
	}
	if err := unix.Chmod(sg, 0o2777); err != nil {
		t.Fatal(err)
	}
	a := s46Applier(t, root)
	// The primary's team/tool: owned by uid 65534, group staff, 02755
	// (an admin's chown+chmod), already replicated.
	if err := s46Apply(t, a,
		wire.Op{Code: wire.OpCreate, Path: "team/tool", Mode: 0o2755},
		wire.Op{Code: wire.OpWrite, Path: "team/tool", Data: []byte("#!/bin/true\n")},
		wire.Op{Code: wire.OpSetattr, Path: "team/tool", Mode: 0o2755, UID: s46Nobody, GID: staff, Mtime: 42, Atime: 42},
	); err != nil {
		t.Fatal(err)
	}
	s46AsUser(t, sg, `printf 'user payload\n' > .p && chmod 755 .p && mv -f .p tool`)
	planted := s46Lstat(t, filepath.Join(sg, "tool"))
	if planted.Uid != s46Nobody || planted.Gid != staff || planted.Mode&unix.S_ISGID != 0 {
		t.Fatalf("plant: uid %d gid %d mode %o", planted.Uid, planted.Gid, planted.Mode&0o7777)
	}
	// The primary's admin touches the tool (or chmods it again): setattr.
	err := s46Apply(t, a, wire.Op{Code: wire.OpSetattr, Path: "team/tool", Mode: 0o2755, UID: s46Nobody, GID: staff, Mtime: 43, Atime: 43})
	st := s46Lstat(t, filepath.Join(sg, "tool"))
	if st.Ino == planted.Ino && st.Mode&unix.S_ISGID != 0 {
		t.Fatalf("the local user's file (uid %d, not in group %d) is now mode %o gid %d: set-gid to a group of which the user is not a member (err %v)",
			st.Uid, staff, st.Mode&0o7777, st.Gid, err)
	}
}
