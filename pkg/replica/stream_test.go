package replica

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// deepTree makes depth nested directories "d" under dir, and in the
// deepest a file f1 with a second name f2; it returns their directory's
// path relative to dir.
func deepTree(t *testing.T, dir string, depth int) string {
	t.Helper()
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	for range depth {
		if err := unix.Mkdirat(fd, "d", 0o755); err != nil {
			t.Fatal(err)
		}
		nfd, err := unix.Openat(fd, "d", unix.O_RDONLY|unix.O_DIRECTORY, 0)
		unix.Close(fd)
		if err != nil {
			t.Fatal(err)
		}
		fd = nfd
	}
	defer unix.Close(fd)
	f, err := unix.Openat(fd, "f1", unix.O_CREAT|unix.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	unix.Write(f, []byte("shared"))
	unix.Close(f)
	if err := unix.Linkat(fd, "f1", fd, "f2", 0); err != nil {
		t.Fatal(err)
	}
	return strings.Repeat("d/", depth)
}

func inoBeneath(t *testing.T, root, rel string) uint64 {
	t.Helper()
	r, err := fstree.OpenRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	st, err := fstree.Stat(r, rel)
	if err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestStreamSyncDeepHardLink: a file with two names deeper than 4,096
// directories (the wire takes paths of 64 KiB) stays one file on the
// peer, sent as it is read or listed. The shadow gave up finding a path
// past that depth, so the streamed sync sent the second name as another
// file (found by review).
func TestStreamSyncDeepHardLink(t *testing.T) {
	const depth = 4100
	// The walk holds a descriptor per level.
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < depth+256 {
		t.Skipf("needs %d open files (a walk holds one per level), the limit is %d", depth+256, lim.Cur)
	}
	top := t.TempDir()
	src := filepath.Join(top, "src")
	if err := os.Mkdir(src, 0o755); err != nil {
		t.Fatal(err)
	}
	dir := deepTree(t, src, depth)
	root, _ := scanSource(t, src)
	for _, streamed := range []bool{false, true} {
		dst := filepath.Join(top, map[bool]string{false: "listed", true: "streamed"}[streamed])
		if err := os.Mkdir(dst, 0o755); err != nil {
			t.Fatal(err)
		}
		b, _ := applyingBuilder(t, root, nil, dst)
		if streamed {
			if _, err := b.streamSync(func(fn func(*wire.Entry) error) (int, error) { return fstree.Walk(root, false, fn) }, nil, nil); err != nil {
				t.Fatal(err)
			}
		} else {
			ll, _, err := scanListing(root, false)
			if err != nil {
				t.Fatal(err)
			}
			if err := b.fullSync(ll, listingOf(nil), nil); err != nil {
				t.Fatal(err)
			}
		}
		if a, c := inoBeneath(t, dst, dir+"f1"), inoBeneath(t, dst, dir+"f2"); a != c {
			t.Errorf("streamed %v: f1 and f2 are one file here, two on the peer (%d, %d)", streamed, a, c)
		}
	}
}

// TestFirstResyncToNonEmptyPeer: a first resync to a peer whose copy holds
// files of its own compares the two (those files are removed), where
// one to an empty peer only sends.
func TestFirstResyncToNonEmptyPeer(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	writeRandom(t, filepath.Join(src, "a"), 5000)
	writeRandom(t, filepath.Join(src, "dir/b"), 100)
	sec := newTestSecondary(t, filepath.Join(t.TempDir(), "state"))
	writeRandom(t, filepath.Join(sec.data, "stale"), 10)
	writeRandom(t, filepath.Join(sec.data, "dir/old"), 10)
	p := runPrimary(t, src, sec.addr, testLink)
	var st Status
	waitFor(t, "the first resync", func() bool {
		st = p.Status()
		return st.InSync && st.FullSyncs > 0 && !st.Resync.Active
	})
	sameTrees(t, src, sec.data)
}

// TestStreamSyncStopsWithItsConnection: once the connection of a resync to
// an empty peer ends, the walk ends too. It went on reading the tree and
// queueing it all for a peer that no longer read it (found by review).
func TestStreamSyncStopsWithItsConnection(t *testing.T) {
	defer func(r, u int) { batchRaw, maxUnacked = r, u }(batchRaw, maxUnacked)
	batchRaw, maxUnacked = 64<<10, 256<<10
	src := filepath.Join(t.TempDir(), "src")
	for i := range 64 {
		writeRandom(t, filepath.Join(src, "f"+strings.Repeat("x", i)), 128<<10)
	}
	p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	bt := &batcher{p: p, ctx: ctx}
	if err := p.streamSync(nil, bt, resyncPlan{mode: "full", all: true}, resyncRun{start: time.Now()}, nil); err == nil {
		t.Error("the resync's connection ended, and it did not say so")
	}
	if read := p.rsSent.Load(); read > 2*uint64(maxUnacked) {
		t.Fatalf("read %d bytes (%d queued) after its connection ended", read, p.out.bytes)
	}
}

// TestStreamSyncKeepsWriteBeyondWalkedSize: a change the journal held when
// a resync to an empty peer began, reported beyond the size the walk then
// saw of its file (a write reported before it moved the size), stays
// queued past that size, as in a resync that compares.
func TestStreamSyncKeepsWriteBeyondWalkedSize(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	writeRandom(t, filepath.Join(src, "a"), 100)
	writeRandom(t, filepath.Join(src, "b"), 100)
	p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	a, b := span(t, filepath.Join(src, "a"), 50, 4096), span(t, filepath.Join(src, "b"), 0, 100)
	a.Key.Dev, b.Key.Dev = p.Dev, p.Dev
	bt := &batcher{p: p, ctx: context.Background()}
	if err := p.streamSync(nil, bt, resyncPlan{mode: "full", all: true}, resyncRun{start: time.Now()}, []journal.File{a, b}); err != nil {
		t.Fatal(err)
	}
	p.mu.Lock()
	left := p.j.Take(time.Now())
	p.mu.Unlock()
	if len(left) != 1 || left[0].Key != a.Key || left[0].Data.Spans()[0] != (journal.Span{Off: 100, End: 4096}) {
		t.Fatalf("queued after the resync: %+v, want a's [100,4096) only", left)
	}
}

// TestManifestFirstFrameEarly: a replica sends the first frame of its
// manifest as soon as it names an entry besides the root, so that the
// primary of a full comparison, which waits for it before it scans its own
// tree (an empty copy is sent the tree as it is read), waits for one entry
// and not for a frame of 256 KiB of them, checksummed.
func TestManifestFirstFrameEarly(t *testing.T) {
	dir := t.TempDir()
	for i := range 50 {
		writeRandom(t, filepath.Join(dir, fmt.Sprintf("f%03d", i)), 1000)
	}
	s := &Server{Log: slog.New(slog.DiscardHandler)}
	c, peer := net.Pipe()
	defer peer.Close()
	go func() {
		s.sendManifest(c, Dir{Name: "data", Path: dir}, 7, wire.ManifestQuery{All: true})
		c.Close()
	}()
	var frames [][]wire.Entry
	for {
		f, err := wire.ReadFrame(peer, nil)
		if err != nil {
			t.Fatal(err)
		}
		if f.Type == wire.TypeEnd {
			break
		}
		raw, err := wire.Payload(&f, nil)
		if err != nil {
			t.Fatal(err)
		}
		es, err := wire.DecodeEntries(raw)
		if err != nil {
			t.Fatal(err)
		}
		frames = append(frames, es)
	}
	if len(frames) < 2 || len(frames[0]) != 2 || frames[0][0].Path != "." || frames[0][1].Path != "f000" {
		var sizes []int
		for _, es := range frames {
			sizes = append(sizes, len(es))
		}
		t.Fatalf("manifest frames of %v entries: want the root and f000 first, the rest after", sizes)
	}
	n := 0
	for _, es := range frames {
		n += len(es)
	}
	if n != 51 {
		t.Fatalf("%d entries in the manifest, want 51", n)
	}
}

// TestResyncStopsWithinAFile: a resync whose connection ends while it
// reads a large file stops reading it. It read the rest of the file into
// the queue, unbounded (found by review: the link dropping 1 GB into a
// 200 GB image).
func TestResyncStopsWithinAFile(t *testing.T) {
	defer func(r, u int) { batchRaw, maxUnacked = r, u }(batchRaw, maxUnacked)
	batchRaw, maxUnacked = 64<<10, 256<<10
	src := filepath.Join(t.TempDir(), "src")
	writeRandom(t, filepath.Join(src, "big"), 32<<20)
	p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	bt := &batcher{p: p, ctx: ctx}
	done := make(chan error, 1)
	go func() {
		done <- p.streamSync(nil, bt, resyncPlan{mode: "full", all: true}, resyncRun{start: time.Now()}, nil)
	}()
	waitFor(t, "the queue to fill", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.out.bytes > maxUnacked
	})
	before := p.rsSent.Load()
	cancel()
	p.wake()
	if err := <-done; err == nil {
		t.Error("the resync's connection ended, and it did not say so")
	}
	if read := p.rsSent.Load() - before; read > uint64(2*batchRaw) {
		t.Fatalf("read %d bytes more after its connection ended", read)
	}
}

// TestStreamSyncReusedInodeNumber: a file removed after the walk sent it,
// its inode number then reused by a file the walk reaches later, is not
// a hard link of the first: the peer's copy of the new file held the old
// one's bytes wherever the new one had holes (found by review).
func TestStreamSyncReusedInodeNumber(t *testing.T) {
	src, dst, root, b, sink := reusedPair(t)
	var aIno uint64
	walk := func(fn func(*wire.Entry) error) (int, error) {
		return fstree.Walk(root, false, func(e *wire.Entry) error {
			switch e.Path {
			case "a":
				aIno = e.Ino
			case "z/b": // a removed after it was sent; its number reused (simulated)
				os.Remove(filepath.Join(src, "a"))
				e.Ino = aIno
			}
			return fn(e)
		})
	}
	if _, err := b.streamSync(walk, nil, nil); err != nil {
		t.Fatal(err)
	}
	checkReused(t, dst, b, sink, aIno)
}

// reusedPair is a tree of a (1 MiB) and z/b at src, an empty peer at
// dst and a builder between them, for the tests of a reused number.
func reusedPair(t *testing.T) (src, dst string, root *os.File, b *builder, sink *applySink) {
	t.Helper()
	top := t.TempDir()
	src = filepath.Join(top, "src")
	writeRandom(t, filepath.Join(src, "a"), 1<<20)
	writeRandom(t, filepath.Join(src, "z/b"), 4096)
	root, _ = scanSource(t, src)
	dst = filepath.Join(top, "dst")
	if err := os.Mkdir(dst, 0o755); err != nil {
		t.Fatal(err)
	}
	b, sink = applyingBuilder(t, root, nil, dst)
	return src, dst, root, b, sink
}

// checkReused fails t unless z/b, given a's number aIno, was not sent as
// a link of a, a is gone from the peer, and the shadow knows the number
// by z/b alone.
func checkReused(t *testing.T, dst string, b *builder, sink *applySink, aIno uint64) {
	t.Helper()
	for _, op := range sink.ops {
		if op.Code == wire.OpLink {
			t.Fatalf("z/b sent as a link of %q, a name that no longer names its inode", op.Path)
		}
	}
	// (z/b's bytes are not checked: its open finds another inode than
	// the simulated number, and leaves it to the next pass.)
	if _, err := os.Lstat(filepath.Join(dst, "a")); !os.IsNotExist(err) {
		t.Fatalf("the peer's a, removed here: %v", err)
	}
	if names := b.sh.names(aIno); len(names) != 1 {
		t.Fatalf("the shadow's names of the reused number: %v, want z/b alone", names)
	}
	if p, _ := b.sh.path(aIno); p != "z/b" {
		t.Fatalf("the shadow's path of the reused number: %q, want z/b", p)
	}
}

// TestFullSyncReusedInodeNumber is TestStreamSyncReusedInodeNumber for a
// resync that compares: over its scan's window, the same reuse made the
// second file a link of the first.
func TestFullSyncReusedInodeNumber(t *testing.T) {
	src, dst, root, b, sink := reusedPair(t)
	ll, _, err := scanListing(root, false)
	if err != nil {
		t.Fatal(err)
	}
	// a removed after the scan; its number reused by z/b (simulated).
	var aIno uint64
	for i := range ll.len() {
		switch e := ll.at(i); e.path {
		case "a":
			aIno = e.ino
		case "z/b":
			e.ino = aIno
		}
	}
	os.Remove(filepath.Join(src, "a"))
	if err := b.fullSync(ll, listingOf(nil), nil); err != nil {
		t.Fatal(err)
	}
	checkReused(t, dst, b, sink, aIno)
}

// A batcher lets go of the room big batches grew (4 MiB after a full sync
// or a burst) when a small batch follows, and keeps it while they go on.
func TestBatcherLetsGoOfBigBuffer(t *testing.T) {
	p, err := NewPrimary(Dir{Name: "data", Path: t.TempDir()}, "127.0.0.1:1", testLink, 0, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	bt := &batcher{p: p, ctx: context.Background()}
	big := &wire.Op{Code: wire.OpWrite, Path: "f", Data: make([]byte, 1<<20)}
	small := &wire.Op{Code: wire.OpWrite, Path: "f", Data: make([]byte, 100)}
	for range 3 {
		if err := bt.add(big); err != nil {
			t.Fatal(err)
		}
	}
	bt.flush()
	grown := cap(bt.raw)
	if grown < 3<<20 {
		t.Fatalf("the buffer holds %d bytes after three 1 MiB writes", grown)
	}
	if err := bt.add(big); err != nil {
		t.Fatal(err)
	}
	bt.flush()
	if cap(bt.raw) != grown {
		t.Fatalf("a big batch after big ones: room %d, want %d kept", cap(bt.raw), grown)
	}
	if err := bt.add(small); err != nil {
		t.Fatal(err)
	}
	bt.flush()
	if cap(bt.raw) > batchKeep {
		t.Fatalf("a small batch after big ones left %d bytes of room, want at most %d", cap(bt.raw), batchKeep)
	}
	p.mu.Lock()
	n := len(p.out.batches)
	p.mu.Unlock()
	if n != 3 {
		t.Fatalf("%d batches queued, want 3", n)
	}
}

// TestResyncShadowsKnowGenerations: both scans a resync builds the
// primary's shadow from (the walk of a sync to an empty peer, the listing
// of a comparison) read each inode's generation, which tells a later inode
// given the same number from the one listed (TestBuildAsideOfScannedFileKept).
func TestResyncShadowsKnowGenerations(t *testing.T) {
	src := filepath.Join(t.TempDir(), "src")
	writeRandom(t, filepath.Join(src, "d/f"), 100)
	writeRandom(t, filepath.Join(src, "g"), 10)
	if err := os.Symlink("../g", filepath.Join(src, "d/l")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(src, "e"), 0o755); err != nil {
		t.Fatal(err)
	}
	check := func(t *testing.T, sh *shadow) {
		t.Helper()
		for _, rel := range []string{"d", "d/f", "d/l", "e", "g"} {
			d, err := os.Open(filepath.Join(src, filepath.Dir(rel)))
			if err != nil {
				t.Fatal(err)
			}
			_, want, ok := fstree.Generation(int(d.Fd()), filepath.Base(rel))
			d.Close()
			if !ok {
				t.Skipf("no generation in the file handles of %s", src)
			}
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(src, rel), &st); err != nil {
				t.Fatal(err)
			}
			n, found := sh.node(st.Ino)
			if !found || !n.genKnown || n.gen != want {
				t.Errorf("%s: in the shadow %v, generation %#x known %v; want %#x", rel, found, n.gen, n.genKnown, want)
			}
		}
		if n, _ := sh.node(sh.root); !n.genKnown {
			t.Errorf("the root's generation is not known")
		}
	}
	t.Run("stream", func(t *testing.T) {
		p, err := NewPrimary(Dir{Name: "data", Path: src}, "127.0.0.1:1", testLink, 0, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		bt := &batcher{p: p, ctx: context.Background()}
		if err := p.streamSync(nil, bt, resyncPlan{mode: "full", all: true}, resyncRun{start: time.Now()}, nil); err != nil {
			t.Fatal(err)
		}
		p.mu.Lock()
		sh := p.sh
		p.mu.Unlock()
		check(t, sh)
	})
	t.Run("listing", func(t *testing.T) {
		root, err := fstree.OpenRoot(src)
		if err != nil {
			t.Fatal(err)
		}
		defer root.Close()
		l, _, err := scanListing(root, false)
		if err != nil {
			t.Fatal(err)
		}
		sb := newShadowBuilder(l.len())
		for i := range l.len() {
			e := l.at(i).entry()
			sb.add(&e)
		}
		check(t, sb.done())
	})
}
