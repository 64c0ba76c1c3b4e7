package replica

import (
	"fmt"
	"io/fs"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// treeSync says how the builder's fullSync decides what a file needs.
type treeSync struct {
	// dirty, when set, is a trusted modification bitmap: a file that was
	// not compared by checksums gets the chunks it marks.
	dirty *dirtySet
	// window: files neither compared by checksums nor marked by the
	// bitmap are the same on both sides unless their sizes differ (they
	// did not change since the last sync point).
	window bool
	// report: list what the peer's copy loses (it may hold changes this
	// node never received: a returning old primary).
	report bool
	lines  []string
	// sumMatched: every file here whose peer copy has checksums gets its
	// own before the comparison, where it has none yet (renamed while
	// the peer was away, or missed by localSums).
	sumMatched bool
	// Counters, for the progress report.
	planned   uint64 // bytes the resync will send
	filesSent int
	// onPlan, if set, gets the bytes planned once the renames are known.
	onPlan func(planned uint64)
	// shipped, if set, is told of every file whose changes are all
	// queued (the bitmap forgets them once the peer has them durably).
	shipped func(ino uint64)
}

// fullSync makes the peer's tree equal to local (a pre-order scan) given
// the peer's manifest: files with checksums on both sides send the blocks
// that differ, other files the chunks of the bitmap, files the peer lacks
// are sent whole, entries the primary lacks are removed, a file renamed
// while the peer was away is renamed there, hard links stay links. It
// builds b.sh from local as it goes, and lets go of the entries of both
// listings once compared: the caller must not read them after.
func (b *builder) fullSync(local, peer *listing, ts *treeSync) error {
	if ts == nil {
		ts = &treeSync{}
	}
	pr := pairPaths(local, peer)
	if err := b.renames(pr, ts); err != nil {
		return err
	}
	if ts.sumMatched {
		for i := range local.len() {
			l := local.at(i)
			p := pr.peerOf[i]
			// 64 KiB blocks only, as localSums.match.
			if p != nil && l.mode.IsRegular() && p.mode.IsRegular() && l.flags&wire.EntrySummed == 0 && p.flags&wire.EntrySummed != 0 && blockShift(p.shift) == wire.BlockShift {
				if err := l.sum(b.root); err != nil {
					return err
				}
			}
		}
	}
	ts.plan(pr)
	if ts.onPlan != nil {
		ts.onPlan(ts.planned)
	}
	// Removals first, top-most only: a removed directory takes its subtree.
	var removed []string
	for i := range peer.len() {
		e := peer.at(i)
		p := e.path
		if p == "." || pr.peerFlags[i] != 0 || underAny(p, removed) {
			continue
		}
		if ts.report && e.flags&wire.EntryRecent != 0 {
			ts.lines = append(ts.lines, fmt.Sprintf("%s\tremoved: it exists only on this node", p))
		}
		if err := b.out.add(&wire.Op{Code: wire.OpRemove, Path: p}); err != nil {
			return err
		}
		removed = append(removed, p)
	}
	// The peer's hard links: a copy with other names there is written in
	// place only if they all name this file here (see below). The names
	// it keeps are those paired with a local entry, renames done: the
	// others are removed first.
	peerNames := map[uint64][]string{}
	if peerLinked := linkedInodes(peer); len(peerLinked) > 0 {
		for i := range local.len() {
			if pe := pr.peerOf[i]; pe != nil && linkable(pe.mode) && peerLinked[pe.ino] {
				peerNames[pe.ino] = append(peerNames[pe.ino], local.at(i).path)
			}
		}
	}
	// From here on a peer entry is read only through peerOf, which lets
	// go of each once its local counterpart is compared.
	peer.release(peer.len())
	pr.peer, pr.peerFlags = nil, nil
	// Hard links: inode → the first path sent, for the inodes listed by
	// more than one name only: a map of every file was the largest index
	// of the comparison.
	linked := linkedInodes(local)
	localNames := linkNames(local, linked)
	firstName := map[uint64]string{}
	firstGen := map[uint64]entryGen{}
	// The shadow is built as the comparison goes, and the listing let go
	// of a chunk at a time: both were held whole at once.
	sb := newShadowBuilder(local.len())
	b.sh = sb.s
	for i := range local.len() {
		if err := b.ended(); err != nil {
			return err
		}
		if i%listingChunk == 0 {
			local.release(i)
		}
		le := local.at(i).entry()
		l := &le
		var p *wire.Entry
		if pe := pr.peerOf[i]; pe != nil {
			e := pe.entry()
			p = &e
		}
		pr.peerOf[i] = nil
		sb.add(l)
		if l.Path == "." {
			continue
		}
		if p != nil && p.Mode.Type() != l.Mode.Type() {
			if ts.report && p.Flags&wire.EntryRecent != 0 {
				ts.lines = append(ts.lines, fmt.Sprintf("%s\treplaced: a %s here, a %s on the peer", l.Path, typeName(p.Mode), typeName(l.Mode)))
			}
			p = nil // create replaces whatever is there
		}
		if p != nil && linkable(l.Mode) && !namesOf(l, localNames, peerNames[p.Ino]) {
			// The peer's copy has names that are other files here (a
			// link broken here while the peer was away): written in
			// place it would change them too. Made anew, sent whole.
			if ts.report && p.Flags&wire.EntryRecent != 0 {
				ts.lines = append(ts.lines, fmt.Sprintf("%s\treplaced: its copy here has other names than on this node", l.Path))
			}
			p = nil
		}
		if linkable(l.Mode) && linked[l.Ino] {
			if first, ok := firstName[l.Ino]; ok {
				fg := firstGen[l.Ino]
				if b.sameInode(first, fg.gen, fg.known, l) {
					if err := b.out.add(&wire.Op{Code: wire.OpLink, Path: first, Path2: l.Path}); err != nil {
						return err
					}
					continue
				}
				// A number reused since the scan: see streamSync. This
				// name goes too, and comes back as the only one.
				if err := b.forgetReused(l.Ino); err != nil {
					return err
				}
				sb.add(l)
				p = nil
			}
			firstName[l.Ino] = l.Path
			firstGen[l.Ino] = entryGen{l.Gen, l.Flags&wire.EntryGen != 0}
		}
		if err := b.syncEntry(l, p, ts); err != nil {
			return err
		}
	}
	local.release(local.len())
	sb.done()
	return nil
}

// streamSync sends the tree to a peer that holds none of it, entry by
// entry as walk reads it (a pre-order scan: fstree.Walk): with nothing to
// compare, nothing is listed, and the first files are on the wire while
// the walk goes on. A non-directory whose inode the walk met before under
// another name is a hard link to that name. It builds b.sh as it goes,
// and tells seen, if set, of every entry. It returns the entries whose
// paths are too long for the wire (left out).
func (b *builder) streamSync(walk func(func(*wire.Entry) error) (int, error), ts *treeSync, seen func(*wire.Entry)) (int, error) {
	if ts == nil {
		ts = &treeSync{}
	}
	sb := newShadowBuilder(0)
	b.sh = sb.s
	tooLong, err := walk(func(e *wire.Entry) error {
		if err := b.ended(); err != nil {
			return err
		}
		if seen != nil {
			seen(e)
		}
		if e.Path == "." {
			sb.add(e)
			return nil
		}
		if n, ok := b.sh.node(e.Ino); ok && linkable(e.Mode) && linkable(n.mode) {
			if first, ok := b.sh.path(e.Ino); ok && b.sameInode(first, n.gen, n.genKnown, e) {
				sb.add(e)
				return b.out.add(&wire.Op{Code: wire.OpLink, Path: first, Path2: e.Path})
			}
			// The names sent for this number no longer name it: the
			// file sent under them was removed since, and its number
			// reused (the walk of a large tree takes long enough).
			// They go, on the peer and from the shadow; this file is
			// another, sent whole. What changed meanwhile under those
			// names is in the journal, which follows the resync.
			if err := b.forgetReused(e.Ino); err != nil {
				return err
			}
		}
		sb.add(e)
		return b.syncEntry(e, nil, ts)
	})
	sb.done()
	return tooLong, err
}

// entryGen is a listed inode's generation, if the scan read it.
type entryGen struct {
	gen   uint32
	known bool
}

// sameInode says whether entry e, a name met in the scan after first for
// the same number, is the inode sent under first (of generation gen when
// genKnown): by the generations where the scan read both, else by what
// first names now. Asking first alone took a name moved since the scan
// (a directory above it renamed while the resync ran) for a number
// reused: the name was removed on the peer and from the shadow, and the
// pass that moved the directory did not bring it back (a review:
// TestDivergenceResyncDropsLinkUnderRenamedDirectory).
func (b *builder) sameInode(first string, gen uint32, genKnown bool, e *wire.Entry) bool {
	if genKnown && e.Flags&wire.EntryGen != 0 {
		return gen == e.Gen
	}
	return b.namesNow(first, e.Ino)
}

// namesNow reports whether path p, under the root, names inode ino now.
func (b *builder) namesNow(p string, ino uint64) bool {
	st, err := fstree.Stat(b.root, p)
	return err == nil && st.Ino == ino
}

// forgetReused removes, on the peer and from the shadow, every name the
// shadow knows for inode number ino.
func (b *builder) forgetReused(ino uint64) error {
	for _, l := range b.sh.names(ino) {
		if p, ok := b.sh.linkPath(l); ok {
			if err := b.out.add(&wire.Op{Code: wire.OpRemove, Path: p}); err != nil {
				return err
			}
		}
	}
	b.sh.drop(ino)
	return nil
}

// linkable says whether an entry of mode m is replicated as one inode of
// possibly many names: every type but a directory and a device node (not
// replicated: a link from its name failed on the peer, and every resync
// after it, TestResyncDoesNotLinkUnreplicatedDeviceNode). FIFOs, sockets
// and symlinks are linked too (`ln fifo other`, `ln -P symlink other`); a
// resync that paired regular files only made each of their names a node
// of its own on the peer, while the shadow it left took them for one
// inode (TestDivergenceResyncSplitsLinkedSpecialFiles).
func linkable(m fs.FileMode) bool { return !m.IsDir() && m&fs.ModeDevice == 0 }

// linkedInodes are the inodes of the linkable entries listed by more than
// one name (the shadow built from the listing knows them by as many).
func linkedInodes(local *listing) map[uint64]bool {
	var inos []uint64
	for i := range local.len() {
		if l := local.at(i); linkable(l.mode) {
			inos = append(inos, l.ino)
		}
	}
	slices.Sort(inos)
	linked := map[uint64]bool{}
	for i := 1; i < len(inos); i++ {
		if inos[i] == inos[i-1] {
			linked[inos[i]] = true
		}
	}
	return linked
}

// linkNames lists, for each inode of linked, its paths in lst in listing
// order (the same order on both nodes).
func linkNames(lst *listing, linked map[uint64]bool) map[uint64][]string {
	names := map[uint64][]string{}
	if len(linked) == 0 {
		return names
	}
	for i := range lst.len() {
		if e := lst.at(i); linkable(e.mode) && linked[e.ino] {
			names[e.ino] = append(names[e.ino], e.path)
		}
	}
	return names
}

// namesOf reports whether every one of names is a name of l here.
func namesOf(l *wire.Entry, localNames map[uint64][]string, names []string) bool {
	own := localNames[l.Ino]
	if own == nil {
		own = []string{l.Path}
	}
	for _, n := range names {
		if !slices.Contains(own, n) {
			return false
		}
	}
	return true
}

func typeName(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	case m.IsRegular():
		return "file"
	}
	return "special file"
}

// pairing matches a local listing with the peer's, both in Scan order
// (fstree.ComparePaths), in one pass over both. It replaced an index by
// path of each listing (maps of about 40 bytes an entry) with 9 bytes a
// local entry and 1 a peer's.
type pairing struct {
	local, peer *listing
	// peerOf is the peer's entry at each local entry's path (nil: none),
	// renames done: a file renamed on the peer is there under its new name.
	peerOf []*lentry
	// peerFlags says why a peer entry is not removed: it has a local
	// counterpart, it is renamed away, or a later entry has its path (a
	// map by path kept the last one).
	peerFlags []uint8
}

const (
	peerMatched uint8 = 1 << iota
	peerRenamed
	peerShadowed
)

// pairPaths pairs local with peer, sorting either first if it is not in
// Scan order (equal paths keep their order: the last one counts).
func pairPaths(local, peer *listing) *pairing {
	local.sortByPath()
	peer.sortByPath()
	pr := &pairing{local: local, peer: peer, peerOf: make([]*lentry, local.len()), peerFlags: make([]uint8, peer.len())}
	for j := 0; j+1 < peer.len(); j++ {
		if peer.at(j).path == peer.at(j+1).path {
			pr.peerFlags[j] |= peerShadowed
		}
	}
	j := 0
	for i := range local.len() {
		l := local.at(i).path
		for j < peer.len() && (pr.peerFlags[j]&peerShadowed != 0 || fstree.ComparePaths(peer.at(j).path, l) < 0) {
			j++
		}
		if j < peer.len() && peer.at(j).path == l {
			pr.peerOf[i] = peer.at(j)
			for k := j; k >= 0 && peer.at(k).path == l; k-- {
				pr.peerFlags[k] |= peerMatched
			}
		}
	}
	return pr
}

// localAt is the index of the local entry at path p, or -1.
func (pr *pairing) localAt(p string) int {
	local := pr.local
	i := sort.Search(local.len(), func(i int) bool { return fstree.ComparePaths(local.at(i).path, p) >= 0 })
	// The last of equal paths, as pairPaths pairs them.
	for i+1 < local.len() && local.at(i+1).path == p {
		i++
	}
	if i < local.len() && local.at(i).path == p {
		return i
	}
	return -1
}

// renames finds regular files that exist only here and only on the peer
// with the same size and mtime, in a directory the peer has: renamed while
// the peer was away. They are renamed on the peer before anything is
// removed, and then compared like any file. Only a match that is one of a
// kind on both sides counts: files written within one tick of the coarse
// clock share their mtime, and a guess among them would leave another
// file's bytes under the new name (a bitmap resync trusts unchanged
// files); such files are sent whole.
func (b *builder) renames(pr *pairing, ts *treeSync) error {
	type key struct {
		size  uint64
		mtime int64
	}
	local, peer := pr.local, pr.peer
	gone := map[key][]int{} // peer entries only there, by key
	for j := range peer.len() {
		e := peer.at(j)
		if e.mode.IsRegular() && pr.peerFlags[j]&peerMatched == 0 && e.size > 0 {
			k := key{e.size, e.mtime}
			gone[k] = append(gone[k], j)
		}
	}
	if len(gone) == 0 {
		return nil
	}
	arrived := map[key]int{} // files only here, by key
	for i := range local.len() {
		if l := local.at(i); l.mode.IsRegular() && pr.peerOf[i] == nil {
			arrived[key{l.size, l.mtime}]++
		}
	}
	// Whether the peer has the local directory dir, for the files of one
	// directory (consecutive in Scan order) in turn.
	lastDir, dirOK := "", false
	for i := range local.len() {
		l := local.at(i)
		if !l.mode.IsRegular() || pr.peerOf[i] != nil {
			continue
		}
		dir := path.Dir(l.path)
		if dir != "." {
			if dir != lastDir {
				d := pr.localAt(dir)
				lastDir, dirOK = dir, d >= 0 && pr.peerOf[d] != nil && pr.peerOf[d].mode.IsDir()
			}
			if !dirOK {
				continue // the directory is new: created later, in order
			}
		}
		k := key{l.size, l.mtime}
		cands := gone[k]
		if len(cands) != 1 || arrived[k] != 1 {
			continue // none, or ambiguous
		}
		from := peer.at(cands[0])
		gone[k] = nil
		if err := b.out.add(&wire.Op{Code: wire.OpRename, Path: from.path, Path2: l.path}); err != nil {
			return err
		}
		moved := *from
		moved.path = l.path
		pr.peerFlags[cands[0]] |= peerRenamed
		pr.peerOf[i] = &moved
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

func (b *builder) syncEntry(l, p *wire.Entry, ts *treeSync) error {
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
		c, err := b.syncFile(l, p, ts)
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

// fileSpans is what must be sent of regular file l to the peer's p: the
// spans (whole: everything), and whether the size must be set.
func fileSpans(l, p *wire.Entry, ts *treeSync) (spans []journal.Span, whole bool) {
	lSummed, pSummed := l.Flags&wire.EntrySummed != 0, p.Flags&wire.EntrySummed != 0
	switch {
	case lSummed && pSummed && l.SumShift() != p.SumShift():
		// Blocks of different sizes cannot be compared: sumCompared sums
		// this side as the peer did, so only a file summed before the
		// peer's manifest came, then paired with another, gets here.
		return nil, true
	case lSummed && pSummed:
		var r journal.Ranges
		bs := uint64(1) << l.SumShift()
		for i := range l.Sums {
			if i < len(p.Sums) && p.Sums[i] == l.Sums[i] {
				continue
			}
			off := uint64(i) * bs
			end := min(off+bs, l.Size)
			// A block of zeros beyond the peer's old size is already a hole.
			if i >= len(p.Sums) && l.Sums[i] == zeroSum(end-off) {
				continue
			}
			r.Add(off, end-off)
		}
		return r.Spans(), false
	case lSummed || pSummed || l.Flags&wire.EntryRecent != 0:
		// Checksums were wanted (the file changed since the cutoff here
		// or there) and one side has none: the file was moved or
		// replaced before they were read, or it is paired with a file
		// renamed on the peer, which may be another file of the same
		// size and mtime (cp -p), or this one rewritten with its mtime
		// set back. Neither the bitmap nor the size can tell: send it
		// whole (opened, a file moved since the scan is sent where it
		// now is).
		return nil, true
	case ts.dirty != nil:
		spans, whole = ts.dirty.spans(l.Ino, l.Size)
		if !whole && !ts.dirty.has(l.Ino) && p.Size != l.Size {
			// Unchanged by the bitmap, yet not the same size: the
			// bitmap missed something. Send it all.
			whole = true
		}
		return spans, whole
	case ts.window:
		return nil, p.Size != l.Size
	}
	return nil, true
}

// plan counts what fullSync will send (renames done), for the progress
// report.
func (ts *treeSync) plan(pr *pairing) {
	ts.planned = 0
	for i := range pr.local.len() {
		l := pr.local.at(i)
		if !l.mode.IsRegular() {
			continue
		}
		p := pr.peerOf[i]
		if p == nil || !p.mode.IsRegular() {
			ts.planned += l.size
			continue
		}
		le, pe := l.entry(), p.entry()
		spans, whole := fileSpans(&le, &pe, ts)
		if whole {
			ts.planned += l.size
		}
		for _, s := range spans {
			ts.planned += s.Len()
		}
	}
}

// syncFile sends what the peer's p lacks of l (all of it when the peer has
// no such file), and the size.
func (b *builder) syncFile(l, p *wire.Entry, ts *treeSync) (bool, error) {
	whole := p == nil
	var spans []journal.Span
	if p != nil {
		// Decided from the scan before the file is opened: most files
		// of a resync are unchanged, and opening each of them was a third
		// of a clean restart's comparison (issue 18). One changed or moved
		// since the scan is in the journal, which follows the resync.
		spans, whole = fileSpans(l, p, ts)
		changed := p.Size != l.Size || whole || len(spans) > 0
		if ts.report && p.Flags&wire.EntryRecent != 0 && changed {
			ts.lines = append(ts.lines, discarded(l, p, spans, whole))
		}
		if !changed {
			return false, nil
		}
	} else if err := b.out.add(&wire.Op{Code: wire.OpCreate, Path: l.Path, Mode: fstree.UnixPerm(l.Mode)}); err != nil {
		return true, err
	}
	// O_NONBLOCK: a file replaced by a FIFO since the scan would block.
	f, err := fstree.OpenBeneath(b.root, l.Path, fstree.ReadFlags)
	var st unix.Stat_t
	if err == nil && (unix.Fstat(int(f.Fd()), &st) != nil || st.Ino != l.Ino || st.Mode&unix.S_IFMT != unix.S_IFREG) {
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
	ts.filesSent++
	if whole {
		if err := b.sendWhole(l.Path, f, false); err != nil {
			return true, err
		}
	} else {
		if p.Size != l.Size {
			if err := b.out.add(&wire.Op{Code: wire.OpTruncate, Path: l.Path, Off: l.Size}); err != nil {
				return true, err
			}
		}
		for _, s := range spans {
			if err := b.ship(l.Path, f, s); err != nil {
				return true, err
			}
		}
	}
	if ts.shipped != nil {
		ts.shipped(l.Ino)
	}
	return true, nil
}

// discarded describes, for the report, what the peer's copy of a file it
// changed loses.
func discarded(l, p *wire.Entry, spans []journal.Span, whole bool) string {
	var parts []string
	if p.Size != l.Size {
		parts = append(parts, fmt.Sprintf("size %d on this node, %d kept", p.Size, l.Size))
	}
	if whole {
		parts = append(parts, "content replaced whole")
	} else if len(spans) > 0 {
		var n uint64
		var rs []string
		for i, s := range spans {
			n += s.Len()
			if i < 8 {
				rs = append(rs, fmt.Sprintf("%d-%d", s.Off, s.End))
			}
		}
		if len(spans) > 8 {
			rs = append(rs, fmt.Sprintf("... (%d ranges)", len(spans)))
		}
		parts = append(parts, fmt.Sprintf("%d bytes replaced at %s", n, strings.Join(rs, ",")))
	}
	return fmt.Sprintf("%s\t%s", l.Path, strings.Join(parts, "; "))
}

// fullZeroSums holds the checksum of a whole block of zeros for each
// block shift.
var fullZeroSums = func() map[uint64]wire.Sum {
	m := map[uint64]wire.Sum{}
	for s := wire.MinBlockShift; s <= wire.BlockShift; s++ {
		m[1<<s] = fstree.SumBlock(make([]byte, 1<<s))
	}
	return m
}()

// zeroSum is the checksum of n zero bytes (n ≤ BlockSize).
func zeroSum(n uint64) wire.Sum {
	if s, ok := fullZeroSums[n]; ok {
		return s
	}
	return fstree.SumBlock(make([]byte, n))
}
