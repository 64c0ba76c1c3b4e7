package replica

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/wire"
)

// From a review (forty-first session) of 6280dfd: a data-only pass now caches the attributes it read,
// size included (b.shipped.put), but ships no OpTruncate: the peer's size
// is whatever its writes left. When the file grew by something that is
// not a write (ftruncate up, fallocate, a zero range or clone through the
// range lock's hook 34, reported before the size moves) between the drain
// of the pass and its fstat, the growth's own inode record, in the next
// pass, finds the cache "the same" and ships nothing: the peer's file
// stays short while both sides say in sync. Before 6280dfd the data-only
// pass forgot the cache and the next attribute record shipped the size.
func TestDataOnlyPassDoesNotCacheUnshippedSize(t *testing.T) {
	src, dst, b, _ := syncedPair(t, "f")
	b.shipped = attrCache{}
	f := filepath.Join(src, "f")
	syncAttrs(t, src, dst)
	// A write of [0, 10): its data record is drained by pass 1.
	fh, err := os.OpenFile(f, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.WriteAt([]byte("0123456789"), 0); err != nil {
		t.Fatal(err)
	}
	data := span(t, f, 0, 10)
	// The file is extended after the drain, before the pass reads it:
	// its inode record comes in the next pass.
	if err := fh.Truncate(1 << 20); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build([]journal.File{data}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.build([]journal.File{changed(t, f)}); err != nil {
		t.Fatal(err)
	}
	var a, c unix.Stat_t
	unix.Stat(f, &a)
	unix.Stat(filepath.Join(dst, "f"), &c)
	if a.Size != c.Size {
		t.Errorf("after the extend's own record: size %d here, %d on the peer (the data-only pass cached a size it never shipped)", a.Size, c.Size)
	}
}

// From the same review: linkable is "not a directory", which takes in device
// nodes, which are not replicated (syncEntry warns and ships nothing).
// A resync that meets a hard-linked device node's second name now ships
// a link from its first name, which the peer does not have: the link
// fails (ENOENT) on the peer, and so does every resync after it.
func TestResyncDoesNotLinkUnreplicatedDeviceNode(t *testing.T) {
	for _, mode := range []string{"streamed", "compared"} {
		t.Run(mode, func(t *testing.T) {
			top := t.TempDir()
			src, dst := filepath.Join(top, "src"), filepath.Join(top, "dst")
			os.MkdirAll(filepath.Join(src, "d"), 0o755)
			os.MkdirAll(dst, 0o755)
			a := filepath.Join(src, "null")
			if err := unix.Mknod(a, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
				t.Skipf("mknod: %v", err)
			}
			if err := unix.Linkat(unix.AT_FDCWD, a, unix.AT_FDCWD, filepath.Join(src, "d", "null2"), 0); err != nil {
				t.Fatal(err)
			}
			root, local := scanSource(t, src)
			b, sink := applyingBuilder(t, root, nil, dst)
			// applySink fails the test on the peer's error; record it
			// instead, to show which op it is.
			var failed []wire.Op
			b.out = &recordingSink{a: sink.a, t: t, failed: &failed}
			var err error
			if mode == "streamed" {
				_, err = b.streamSync(func(fn func(*wire.Entry) error) (int, error) { return fstree.Walk(root, false, fn) }, nil, nil)
			} else {
				os.Mkdir(filepath.Join(dst, "d"), 0o755)
				syncAttrs(t, src, dst)
				_, peer := peerManifest(t, dst, wire.ManifestQuery{All: true})
				err = b.fullSync(listingOf(local), listingOf(peer), &treeSync{sumMatched: true})
			}
			if err != nil {
				t.Fatalf("resync: %v", err)
			}
			if len(failed) > 0 {
				t.Errorf("the peer refused %d op(s) of the resync: %v", len(failed), failed)
			}
		})
	}
}

// recordingSink applies ops and keeps those the peer refuses.
type recordingSink struct {
	a      *Applier
	t      *testing.T
	failed *[]wire.Op
}

func (s *recordingSink) add(op *wire.Op) error {
	if err := s.a.Apply(op); err != nil {
		*s.failed = append(*s.failed, wire.Op{Code: op.Code, Path: op.Path, Path2: op.Path2})
		s.t.Logf("peer: %s %q %q: %v", op.Code, op.Path, op.Path2, err)
	}
	return nil
}
