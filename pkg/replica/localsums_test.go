package replica

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
)

// A full comparison reads for checksums only the files whose peer copy
// has them: a file the peer lacks, or holds as another type, is sent
// whole and was read twice when every file was summed.
func TestLocalSumsOnlyWhatThePeerHas(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	for _, p := range []string{"a", "d/b", "d/c", "d.x", "e"} {
		writeRandom(t, filepath.Join(src, p), 3000)
	}
	for _, p := range []string{"a", "d/c", "d.x"} {
		writeRandom(t, filepath.Join(dst, p), 3000)
	}
	os.Mkdir(filepath.Join(dst, "e"), 0o755) // a directory there
	root, local := scanSource(t, src)
	_, peer := peerManifest(t, dst, wire.ManifestQuery{All: true})
	ll := listingOf(local)
	s := newLocalSums(root, ll)
	s.match(peer[:2]) // the manifest comes in frames
	s.match(peer[2:])
	if err := s.wait(); err != nil {
		t.Fatal(err)
	}
	want := map[string]bool{"a": true, "d/c": true, "d.x": true}
	for i := range ll.len() {
		e := ll.at(i).entry()
		if summed := e.Flags&wire.EntrySummed != 0; summed != want[e.Path] || summed && len(e.Sums) != 1 {
			t.Errorf("%s: summed %v (%d sums), want %v", e.Path, summed, len(e.Sums), want[e.Path])
		}
	}
}

// A file renamed while the peer was away is compared by checksums under
// its new name in a full comparison, as when every file was summed: its
// unchanged bytes are not sent again.
func TestFullSyncSumsRenamedFile(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "old"), 200000)
	if err := os.CopyFS(dst, os.DirFS(src)); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(filepath.Join(src, "old"))
	os.Chtimes(filepath.Join(dst, "old"), st.ModTime(), st.ModTime())
	os.Rename(filepath.Join(src, "old"), filepath.Join(src, "new"))

	root, local := scanSource(t, src)
	_, peer := peerManifest(t, dst, wire.ManifestQuery{All: true})
	ll := listingOf(local)
	s := newLocalSums(root, ll)
	s.match(peer)
	if err := s.wait(); err != nil {
		t.Fatal(err)
	}
	b, sink := applyingBuilder(t, root, local, dst)
	if err := b.fullSync(ll, listingOf(peer), &treeSync{sumMatched: true}); err != nil {
		t.Fatal(err)
	}
	if sink.bytes != 0 {
		t.Fatalf("sent %d bytes of a renamed, unchanged file: want it compared by checksums", sink.bytes)
	}
	sameTrees(t, src, dst)
}

// Hard links stay links through a full sync, the content sent once: the
// comparison indexes by inode only the files listed by several names.
func TestFullSyncKeepsHardLinks(t *testing.T) {
	top := t.TempDir()
	src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
	writeRandom(t, filepath.Join(src, "a"), 5000)
	writeRandom(t, filepath.Join(src, "c"), 700)
	os.Mkdir(filepath.Join(src, "d"), 0o755)
	if err := os.Link(filepath.Join(src, "a"), filepath.Join(src, "d/b")); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(dst, 0o755)
	root, local := scanSource(t, src)
	b, sink := applyingBuilder(t, root, local, dst)
	if err := b.fullSync(listingOf(local), &listing{}, &treeSync{sumMatched: true}); err != nil {
		t.Fatal(err)
	}
	if sink.bytes != 5700 {
		t.Fatalf("sent %d bytes, want 5700: the linked file once", sink.bytes)
	}
	sa, _ := os.Stat(filepath.Join(dst, "a"))
	sb, err := os.Stat(filepath.Join(dst, "d/b"))
	if err != nil || !os.SameFile(sa, sb) {
		t.Fatalf("d/b is not a link to a on the peer (%v)", err)
	}
	sameTrees(t, src, dst)
}

// In a resync that compares the files changed since a cutoff, those files
// are summed while the peer walks (feedRecent), and only those: the
// others are compared by the bitmap or their size.
func TestLocalSumsFeedRecent(t *testing.T) {
	defer func(n int) { listingChunk = n }(listingChunk)
	listingChunk = 16
	src, _, cutoff := recentPair(t, "old1", "d/old2")
	for i := range 50 {
		writeRandom(t, filepath.Join(src, fmt.Sprintf("d%d/new%02d", i%3, i)), 100+i)
	}
	rewrite(t, filepath.Join(src, "d/old2"))
	root, _ := scanSource(t, src)
	local, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	recent := markRecent(local, cutoff)
	s := newLocalSums(root, local)
	s.feedRecent()
	if err := s.wait(); err != nil {
		t.Fatal(err)
	}
	summed := 0
	for i := range local.len() {
		e := local.at(i)
		if got, want := e.flags&wire.EntrySummed != 0, e.path != "old1" && e.mode.IsRegular(); got != want {
			t.Errorf("%s: summed %v, want %v", e.path, got, want)
		}
		if e.flags&wire.EntrySummed != 0 {
			summed++
		}
	}
	if summed != 51 || len(recent) != 51 {
		t.Fatalf("%d files summed, %d recent: want 51 (the new files and d/old2)", summed, len(recent))
	}
}

// A comparison that fails while the recent files are summed abandons
// them: once abandon returns no worker touches the listing (the race
// detector checks the reads below), though more files were queued than
// the queue holds.
func TestLocalSumsAbandon(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	for i := range 1500 {
		writeRandom(t, filepath.Join(src, fmt.Sprintf("d%d/f%04d", i%10, i)), 10)
	}
	root, _ := scanSource(t, src)
	local, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(markRecent(local, 1)); n != 1500 {
		t.Fatalf("%d files recent, want 1500", n)
	}
	s := newLocalSums(root, local)
	s.feedRecent()
	s.abandon()
	summed := 0
	for i := range local.len() {
		if e := local.at(i); e.flags&wire.EntrySummed != 0 && e.sums != nil {
			summed++
		}
	}
	t.Logf("%d of 1500 files summed before the abandon", summed)
}
