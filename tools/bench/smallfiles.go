package main

import (
	"archive/tar"
	"fmt"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// makeTarball writes a tarball of n small files (1 to 16 KiB of text-like,
// compressible bytes, in nested directories), as a source tree would be,
// and returns the bytes of content.
func makeTarball(path string, n int) (int64, error) {
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	tw := tar.NewWriter(f)
	rng := mrand.New(mrand.NewSource(5))
	words := []string{"func ", "return ", "if err != nil {\n", "}\n", "package main\n", "// comment\n", "x := ", "y", "\t", "0", "nil"}
	var total int64
	for i := range n {
		size := 1024 + rng.Intn(15*1024)
		buf := make([]byte, 0, size)
		for len(buf) < size {
			buf = append(buf, words[rng.Intn(len(words))]...)
		}
		buf = buf[:size]
		name := fmt.Sprintf("src/pkg%02d/sub%d/file%05d.go", i%40, i%7, i)
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(size), ModTime: time.Unix(1700000000, 0), Typeflag: tar.TypeReg}); err != nil {
			return 0, err
		}
		if _, err := tw.Write(buf); err != nil {
			return 0, err
		}
		total += int64(size)
	}
	return total, tw.Close()
}

// smallWork is the small-files workload: extract the tarball into dir (a
// fresh one), then commit the tree with git.
func smallWork(tarball, dir string) {
	os.RemoveAll(dir)
	os.MkdirAll(dir, 0o755)
	for _, c := range [][]string{
		{"tar", "-xf", tarball, "-C", dir},
		{"git", "-C", dir, "init", "-q"},
		{"git", "-C", dir, "add", "-A"},
		{"git", "-C", dir, "-c", "user.name=bench", "-c", "user.email=bench@lab", "commit", "-q", "-m", "import"},
	} {
		if out, err := exec.Command(c[0], c[1:]...).CombinedOutput(); err != nil {
			fail(fmt.Sprintf("%v: %v\n%s", c, err, out))
		}
	}
}

// smallFiles extracts a tarball of a few thousand files on nodeA, then
// commits the tree with git (many small objects, renames, an index
// rewritten): the time until nodeB has it all against the time of the
// same work on nodeA alone, and the bytes on the wire against the bytes
// the workload left on disk.
func (b *bench) smallFiles(runs int) []Figure {
	n := 3000
	if b.quick {
		n = 300
	}
	tarball := filepath.Join(os.TempDir(), "duet-bench-small.tar")
	_, err := makeTarball(tarball, n)
	if err != nil {
		fail("tarball: " + err.Error())
	}
	defer os.Remove(tarball)
	timeF := Figure{Name: fmt.Sprintf("many small files (tar x of %d files, then git init/add/commit): time until nodeB has it all / the same work without duet", n),
		Target: "(context)", Met: true, Unit: "s",
		Note: "duet: from the start of the work on nodeA to `duet status --wait-sync`; baseline: the same work with duet stopped"}
	wireF := Figure{Name: "same, bytes on the wire (duet frames) / bytes the workload wrote (tar contents + .git)",
		Target: "≤ 1.05", Unit: "bytes",
		Note: "text-like files: zstd compresses them, so less than 1 is expected"}
	work := func(dir string) { smallWork(tarball, dir) }
	du := func(dir string) float64 {
		var total int64
		filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
			if err == nil && fi.Mode().IsRegular() {
				total += fi.Size()
			}
			return nil
		})
		return float64(total)
	}
	for i := range runs {
		// Baseline: duet stopped on both nodes.
		b.must("stop", "b")
		b.waitState("a", "ALONE")
		b.must("stop", "a")
		dir := filepath.Join(b.lab, "a/data", fmt.Sprintf("small-%d", i))
		settle()
		t0 := time.Now()
		work(dir + "-local")
		exec.Command("sync").Run()
		base := time.Since(t0).Seconds()
		os.RemoveAll(dir + "-local")
		b.must("start", "a")
		b.waitServing()
		b.must("start", "b")
		b.waitSync()
		settle()
		st0 := b.status().Dirs[0]
		t0 = time.Now()
		work(dir)
		b.waitSync()
		took := time.Since(t0).Seconds()
		st1 := b.status().Dirs[0]
		timeF.add(base, took)
		wireF.add(du(dir), float64(st1.WireBytes-st0.WireBytes))
		os.RemoveAll(dir)
		b.waitSync()
	}
	wireF.Met = median(wireF.Ratio) <= 1.05
	return []Figure{timeF, wireF}
}
