package replica

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// The fuzzed ops name their paths, symlink targets and modes from these
// tables, so that most inputs reach the lookups instead of failing
// validation: escapes by symlinks (made by the tree or by earlier ops), by
// ".." and absolute paths, names too long, what ValidPath refuses. "$OUT"
// stands for the outside directory's absolute path.
var (
	fuzzPaths = []string{
		"a", "a/b", "a/f", "a/b/c", "l", "l/sentinel", "l/sdir", "l/sdir/inner", "a/l", "a/l/sentinel",
		"esc", "esc/sentinel", "esc/sdir", "rel", "rel/sentinel", "x", "a/x",
		"..", "../outside/sentinel", "a/../../outside/sentinel", ".", "a/.", "a//b", "", "/",
		"$OUT/sentinel", "/etc/passwd", "a/\x00",
		strings.Repeat("n", 255), strings.Repeat("n", 255) + "/" + strings.Repeat("n", 255),
		strings.Repeat("m", 256), strings.Repeat(strings.Repeat("d", 255)+"/", 17) + "f",
	}
	fuzzTargets = []string{"$OUT", "$OUT/sentinel", "$OUT/sdir", "../outside", "../../outside/sentinel", "/", ".", "..", "a", "l", "sentinel"}
	fuzzModes   = []uint32{0o4777, 0o777, 0o755, 0o644, 0, 0o7777, unix.S_IFIFO | 0o666, unix.S_IFSOCK | 0o600, unix.S_IFCHR | 0o600, unix.S_IFBLK | 0o600, unix.S_IFDIR | 0o755}
)

// fuzzOpSize is the bytes of input one fuzzed op takes: code, path,
// second path, mode, owner, offset, data length, times.
const fuzzOpSize = 8

// decodeFuzzOps makes ops of fuzz input, fuzzOpSize bytes each.
func decodeFuzzOps(b []byte, outside string, uid, gid uint32) []wire.Op {
	out := func(s string) string { return strings.ReplaceAll(s, "$OUT", outside) }
	var ops []wire.Op
	for ; len(b) >= fuzzOpSize && len(ops) < 64; b = b[fuzzOpSize:] {
		op := wire.Op{
			Code:  wire.OpCode(b[0] % 12), // 0: no such op
			Path:  out(fuzzPaths[int(b[1])%len(fuzzPaths)]),
			Path2: out(fuzzPaths[int(b[2])%len(fuzzPaths)]),
			Mode:  fuzzModes[int(b[3])%len(fuzzModes)],
			Off:   uint64(b[5]) * 1021,
			Len:   uint64(b[6]),
			Mtime: int64(b[7]) * 1e9,
			Atime: int64(b[7]),
		}
		if op.Code == wire.OpSymlink {
			op.Path2 = out(fuzzTargets[int(b[2])%len(fuzzTargets)])
		}
		if b[4]%2 == 1 {
			op.UID, op.GID = uid, gid
		}
		if op.Code == wire.OpWrite {
			op.Data = bytes.Repeat([]byte{'w'}, int(b[6]))
		}
		ops = append(ops, op)
	}
	return ops
}

// fuzzStep is one op of a seed, named by the tables' entries.
type fuzzStep struct {
	code        wire.OpCode
	path, path2 string
	mode        uint32
}

// encodeFuzzSeed makes fuzz input of steps, for the seed corpus.
func encodeFuzzSeed(f *testing.F, steps ...fuzzStep) []byte {
	var b []byte
	for _, s := range steps {
		p2 := byte(0)
		switch {
		case s.code == wire.OpSymlink:
			p2 = index(f, fuzzTargets, s.path2)
		case s.path2 != "":
			p2 = index(f, fuzzPaths, s.path2)
		}
		b = append(b, byte(s.code), index(f, fuzzPaths, s.path), p2, index(f, fuzzModes, s.mode), 1, 3, 5, 7)
	}
	return b
}

// index finds v in a fuzz table, for a seed.
func index[T comparable](f *testing.F, table []T, v T) byte {
	i := slices.Index(table, v)
	if i < 0 {
		f.Fatalf("a seed names %#v, which its table lacks", v)
	}
	return byte(i)
}

// FuzzApplyConfined applies op sequences made of fuzz input to a real
// replica root beside an outside tree, which must not change. `go test`
// runs the seeds; `make fuzz` explores from them.
func FuzzApplyConfined(f *testing.F) {
	deep := fuzzPaths[len(fuzzPaths)-1]
	seeds := [][]fuzzStep{
		{ // a symlink made by an op, then every op through it
			{wire.OpSymlink, "l", "$OUT", 0},
			{wire.OpSetattr, "l/sentinel", "", 0o4777},
			{wire.OpWrite, "l/sentinel", "", 0},
			{wire.OpTruncate, "l/sentinel", "", 0},
			{wire.OpPunch, "l/sentinel", "", 0},
			{wire.OpMkdir, "l/sdir", "", 0o4777},
			{wire.OpCreate, "l/sdir/inner", "", 0o644},
			{wire.OpRemove, "l/sdir", "", 0},
			{wire.OpRename, "l/sentinel", "x", 0},
			{wire.OpLink, "l/sentinel", "x", 0},
			{wire.OpMknod, "l/sdir/inner", "", unix.S_IFIFO | 0o666},
			{wire.OpSymlink, "l/sdir", "/", 0},
			{wire.OpSetattr, "l", "", 0o4777},
		},
		{ // a relative link in a subdirectory, and the tree's own links
			{wire.OpMkdir, "a", "", 0o755},
			{wire.OpSymlink, "a/l", "../../outside/sentinel", 0},
			{wire.OpSetattr, "a/l", "", 0o4777},
			{wire.OpMkdir, "a/l", "", 0o4777},
			{wire.OpSetattr, "esc/sentinel", "", 0o4777},
			{wire.OpSetattr, "esc", "", 0o4777},
			{wire.OpMkdir, "esc", "", 0o4777},
			{wire.OpWrite, "rel/sentinel", "", 0},
			{wire.OpRename, "rel", "a/x", 0},
			{wire.OpWrite, "a/x", "", 0},
		},
		{ // paths that ValidPath refuses, as first and as second path
			{wire.OpWrite, "../outside/sentinel", "", 0},
			{wire.OpSetattr, "a/../../outside/sentinel", "", 0o4777},
			{wire.OpSetattr, "$OUT/sentinel", "", 0o4777},
			{wire.OpRemove, "..", "", 0},
			{wire.OpRemove, "a/.", "", 0},
			{wire.OpRemove, ".", "", 0},
			{wire.OpCreate, "/etc/passwd", "", 0o644},
			{wire.OpRename, "a/f", "a/.", 0},
			{wire.OpRename, "a/f", "..", 0},
			{wire.OpLink, "a/f", "/", 0},
			{wire.OpLink, "a/f", "a//b", 0},
			{wire.OpMkdir, "a/\x00", "", 0o755},
			{wire.OpMkdir, "", "", 0o755},
		},
		{ // long names, a path past PATH_MAX, devices
			{wire.OpMkdir, strings.Repeat("n", 255), "", 0o755},
			{wire.OpSymlink, strings.Repeat("n", 255) + "/" + strings.Repeat("n", 255), "$OUT/sdir", 0},
			{wire.OpSetattr, strings.Repeat("n", 255) + "/" + strings.Repeat("n", 255), "", 0o4777},
			{wire.OpCreate, strings.Repeat("m", 256), "", 0o644},
			{wire.OpCreate, deep, "", 0o644},
			{wire.OpMknod, "a/b", "", unix.S_IFCHR | 0o600},
			{wire.OpMknod, "a/b", "", unix.S_IFBLK | 0o600},
			{wire.OpMknod, "x", "", unix.S_IFIFO | 0o666},
			{wire.OpWrite, "x", "", 0},
			{wire.OpSetattr, "x", "", 0o4777},
		},
		{ // a directory replaced by a symlink to one outside
			{wire.OpRemove, "a", "", 0},
			{wire.OpSymlink, "a", "$OUT/sdir", 0},
			{wire.OpCreate, "a/b", "", 0o644},
			{wire.OpSetattr, "a/f", "", 0o4777},
			{wire.OpRemove, "a/b", "", 0},
			{wire.OpRename, "a", "x", 0},
			{wire.OpSetattr, "x", "", 0o4777},
			{wire.OpMkdir, "x", "", 0o4777},
		},
	}
	for _, s := range seeds {
		f.Add(encodeFuzzSeed(f, s...))
	}
	uid, gid := uint32(os.Getuid()), uint32(os.Getgid())
	if uid == 0 {
		uid, gid = 4242, 4243
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		top := t.TempDir()
		root := filepath.Join(top, "replica")
		outside := outsideTree(t, top)
		for _, d := range []string{root, filepath.Join(root, "a"), filepath.Join(root, "a", "b")} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(root, "a", "f"), []byte("inside"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, filepath.Join(root, "esc")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../outside", filepath.Join(root, "rel")); err != nil {
			t.Fatal(err)
		}
		before := snapshotOutside(t, top, root)
		a, err := NewApplier(root)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Close()
		for _, op := range decodeFuzzOps(b, outside, uid, gid) {
			a.Apply(&op) // many fail, by design: only what they did outside counts
		}
		if err := a.Sync(); err != nil {
			t.Errorf("sync after the ops: %v", err)
		}
		checkOutside(t, before, snapshotOutside(t, top, root))
	})
}
