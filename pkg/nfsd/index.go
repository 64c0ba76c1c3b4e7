package nfsd

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"sync"

	"github.com/duet-ha/duet/pkg/fstree"
	"golang.org/x/sys/unix"
)

// Syncer makes a file's changes durable before the server replies. The
// daemon gives one that also waits until the change is durable on the peer
// (the barrier), so that a handle or a write a client was told about
// survives a failover.
type Syncer interface {
	Sync(f *os.File) error
}

// Fsync is the Syncer of a server that runs without a peer: fsync(2).
type Fsync struct{}

// Sync calls f.Sync.
func (Fsync) Sync(f *os.File) error { return f.Sync() }

// errStale says a handle names no file the export still holds.
var errStale = errors.New("stale file handle")

// index maps file IDs to their place in the export, on disk (logFile) and
// in memory (tree). Every record that gives out a new ID is durable
// before the ID is used in a reply, and every record that takes one back
// is durable before the namespace changes, so that after a crash or a
// failover an ID names the file it was given to or nothing.
type index struct {
	root *os.File // the export, O_PATH: lookups stay beneath it
	// mu serialises every change of the index and of the export's
	// namespace made through the server, from the first check to the
	// last sync, so that the last record of the log is the only one whose
	// change may be half done (settleMove).
	mu sync.Mutex
	// tmu guards t. Changes take it around the system call that changes
	// the namespace, so that a reader never sees an ID at a place that
	// holds another file.
	tmu sync.RWMutex
	t   *tree
	log *logFile
	// undone: settleMove found the log's last rename not done.
	undone bool
}

func openIndex(root *os.File, s Syncer) (*index, error) {
	got, err := openLog(root, s)
	if err != nil {
		return nil, err
	}
	ix := &index{root: root, t: got.tree, log: got.log}
	if got.last != nil && got.last.kind == kindMove {
		// Not applied by replay: the rename may not have been done.
		if err := ix.settleMove(*got.last); err != nil {
			ix.close()
			return nil, err
		}
		// Still the last record if the rename was done: the next
		// creation settles it first (forget).
		if !ix.undone {
			if err := ix.t.apply(*got.last); err != nil {
				slog.Warn("nfs index: the last rename does not apply", "err", err)
			}
			ix.log.lastMove = got.last
		}
	}
	return ix, nil
}

// settleMove decides the rename a log ends with. Its record was made
// durable before the rename; if the old name still exists the rename was
// not done (a rename removes the old name), so both names get their IDs
// back.
func (ix *index) settleMove(m record) error {
	from, ok := ix.t.path(m.from)
	if !ok {
		return nil
	}
	p := join(append(from, m.fromName))
	if _, err := fstree.Stat(ix.root, p); err != nil {
		return nil
	}
	slog.Warn("nfs index: the last rename was not done; its names keep their file IDs", "from", p)
	ix.undone = true
	return ix.commit(undo(m)...)
}

func join(comps []string) string { return strings.Join(comps, "/") }

func last(ids []uint64) uint64 {
	if len(ids) == 0 {
		return rootID
	}
	return ids[len(ids)-1]
}

// resolveLocked returns the ID of the object at comps, giving it and any
// parent without one a new ID, durably, once it is seen to exist (made
// outside the server, or before it first served). mu is held.
func (ix *index) resolveLocked(comps []string) (uint64, error) {
	ids := ix.t.walk(comps)
	parent := last(ids)
	var recs []record
	for i := len(ids); i < len(comps); i++ {
		if _, err := fstree.Stat(ix.root, join(comps[:i+1])); err != nil {
			return 0, err
		}
		id, err := ix.newID(recs)
		if err != nil {
			return 0, err
		}
		recs = append(recs, record{kind: kindSet, id: id, parent: parent, name: comps[i]})
		parent = id
	}
	if err := ix.commit(recs...); err != nil {
		return 0, err
	}
	return parent, nil
}

// namesLocked returns the IDs of the entries names of the directory dir,
// giving new IDs in one durable append; 0 for an entry that vanished. mu
// is held.
func (ix *index) namesLocked(dir []string, names []string) ([]uint64, error) {
	pid, err := ix.resolveLocked(dir)
	if err != nil {
		return nil, err
	}
	ids := make([]uint64, len(names))
	var recs []record
	for i, n := range names {
		if id, ok := ix.t.child(pid, n); ok {
			ids[i] = id
			continue
		}
		if _, err := fstree.Stat(ix.root, join(append(dir[:len(dir):len(dir)], n))); err != nil {
			continue
		}
		if ids[i], err = ix.newID(recs); err != nil {
			return nil, err
		}
		recs = append(recs, record{kind: kindSet, id: ids[i], parent: pid, name: n})
	}
	return ids, ix.commit(recs...)
}

// locate returns the place of id, checking (under the read lock, so that
// no rename slips in between) that an object is there.
func (ix *index) locate(id uint64) ([]string, error) {
	ix.tmu.RLock()
	defer ix.tmu.RUnlock()
	comps, ok := ix.t.path(id)
	if !ok {
		return nil, fmt.Errorf("file ID %#x: %w", id, errStale)
	}
	if _, err := fstree.Stat(ix.root, join(comps)); err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR) {
			return nil, fmt.Errorf("file ID %#x at %q: %w (%v)", id, join(comps), errStale, err)
		}
		// Not an answer about the file (the supervisor that traps this
		// server's calls is gone: ENOSYS; an I/O error): STALE would
		// tell the client its handle is dead for good.
		return nil, fmt.Errorf("file ID %#x at %q: %w", id, join(comps), err)
	}
	return comps, nil
}

// newID draws a random ID that no live entry (nor one of pending) uses.
// Random rather than counted: an ID is never handed out twice, even
// after the record of a removed file was compacted away, so an old
// handle of a removed file stays stale.
func (ix *index) newID(pending []record) (uint64, error) {
	var b [8]byte
	for {
		if _, err := rand.Read(b[:]); err != nil {
			return 0, err
		}
		id := binary.LittleEndian.Uint64(b[:])
		if id <= rootID || ix.t.nodes[id] != nil {
			continue
		}
		clash := false
		for _, r := range pending {
			clash = clash || r.id == id
		}
		if !clash {
			return id, nil
		}
	}
}

// commit appends recs durably, then applies them, then compacts the log
// if it is due. mu is held.
func (ix *index) commit(recs ...record) error {
	if len(recs) == 0 {
		return nil
	}
	if err := ix.log.append(recs...); err != nil {
		return err
	}
	ix.tmu.Lock()
	for _, r := range recs {
		if err := ix.t.apply(r); err != nil {
			slog.Warn("nfs index: record does not apply", "err", err)
		}
	}
	ix.tmu.Unlock()
	ix.log.compact(ix.t)
	return nil
}

// placeNew gives the new object name in parent a new ID. mu is held, and
// the object is durable: a handle must never name what a crash undoes.
func (ix *index) placeNew(parent uint64, name string) (uint64, error) {
	id, err := ix.newID(nil)
	if err != nil {
		return 0, err
	}
	return id, ix.commit(record{kind: kindSet, id: id, parent: parent, name: name})
}

// forget drops the ID at name in parent, if any, durably. mu is held. It
// runs before a new object takes a name whose object vanished: otherwise
// a crash between the creation and the new record would leave the old ID
// naming the new object.
//
// A log that ends with a rename gets a record after it first (the moved
// ID set where it is, which changes nothing): the new object may take the
// rename's old name, and a crash before its own record is appended would
// leave the rename last, with its old name present, which settleMove
// reads as a rename not done: it gave the moved ID back to the old name,
// now the new object's, and the replaced one to the moved file
// (TestSettleMoveAfterRecreatedSource, from a review). The rename is
// durable by now: mu was held until its directories were synced.
func (ix *index) forget(parent uint64, name string) error {
	var recs []record
	if m := ix.log.lastMove; m != nil {
		if n := ix.t.nodes[m.id]; n != nil {
			recs = append(recs, record{kind: kindSet, id: m.id, parent: n.parent, name: n.name})
		}
	}
	if id, ok := ix.t.child(parent, name); ok {
		recs = append(recs, record{kind: kindDel, id: id})
	}
	return ix.commit(recs...)
}

// remove takes the ID at name in parent back durably, then runs do (the
// unlink). If do fails the ID is put back. mu is held.
func (ix *index) remove(parent uint64, name string, do func() error) error {
	id, ok := ix.t.child(parent, name)
	if !ok {
		return do()
	}
	if err := ix.commit(record{kind: kindDel, id: id}); err != nil {
		return err
	}
	err := do()
	if err != nil {
		if rerr := ix.commit(record{kind: kindSet, id: id, parent: parent, name: name}); rerr != nil {
			slog.Warn("nfs index: putting back the ID of a file that could not be removed", "name", name, "err", rerr)
		}
	}
	return err
}

// move records the rename m durably, then runs do (the rename) and
// applies m in one step under tmu. If do fails, records that take m back
// follow it. mu is held.
func (ix *index) move(m record, do func() error) error {
	if err := ix.log.append(m); err != nil {
		return err
	}
	ix.tmu.Lock()
	err := do()
	if err == nil {
		if aerr := ix.t.apply(m); aerr != nil {
			slog.Warn("nfs index: rename does not apply", "err", aerr)
		}
	}
	ix.tmu.Unlock()
	if err != nil {
		if uerr := ix.log.append(undo(m)...); uerr != nil {
			slog.Warn("nfs index: recording that a rename failed", "err", uerr)
		}
	}
	return err
}

// under reports whether a is b or one of its ancestors. mu is held.
func (ix *index) under(a, b uint64) bool {
	for steps := 0; steps <= len(ix.t.nodes); steps++ {
		if b == a {
			return true
		}
		n := ix.t.nodes[b]
		if n == nil || b == rootID {
			return false
		}
		b = n.parent
	}
	return false
}

func (ix *index) close() {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	ix.log.close()
}
