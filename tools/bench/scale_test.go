package main

import (
	"io/fs"
	mrand "math/rand"
	"path/filepath"
	"testing"
)

// TestScaleTree: the tree has every file once, a tenth in the huge
// directory and no other directory over scaleDirSize entries, with sizes
// of 0 to 8 KiB and about one in twenty of 64 KiB.
func TestScaleTree(t *testing.T) {
	const files = 12_345
	root := t.TempDir()
	tree := scaleTree{files}
	written := tree.make(root, mrand.New(mrand.NewSource(1)))
	perDir := map[string]int{}
	var total int64
	big := 0
	filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if d.IsDir() {
			return nil
		}
		fi, _ := d.Info()
		switch n := fi.Size(); {
		case n == 64<<10:
			big++
		case n > 8<<10:
			t.Errorf("%s: %d bytes, not 0 to 8 KiB nor 64 KiB", p, n)
		}
		total += fi.Size()
		rel, _ := filepath.Rel(root, filepath.Dir(p))
		perDir[rel]++
		return nil
	})
	count := 0
	for dir, n := range perDir {
		count += n
		if dir != "scale/huge" && n > scaleDirSize {
			t.Errorf("%s: %d files, want at most %d", dir, n, scaleDirSize)
		}
	}
	if count != files || perDir["scale/huge"] != files/10 {
		t.Errorf("%d files, %d in scale/huge; want %d, %d", count, perDir["scale/huge"], files, files/10)
	}
	if want := 1 + (files-files/10+scaleDirSize-1)/scaleDirSize; len(perDir) != want {
		t.Errorf("%d directories, want %d", len(perDir), want)
	}
	if total != written {
		t.Errorf("make says %d bytes, the tree holds %d", written, total)
	}
	if share := float64(big) / files; share < 0.04 || share > 0.06 {
		t.Errorf("%.3f of the files are 64 KiB, want about 0.05", share)
	}

	// change rewrites existing files: the tree keeps its shape.
	tree.change(root, 100, mrand.New(mrand.NewSource(2)))
	after := 0
	filepath.WalkDir(root, func(_ string, d fs.DirEntry, _ error) error {
		if !d.IsDir() {
			after++
		}
		return nil
	})
	if after != files {
		t.Errorf("after change: %d files, want %d", after, files)
	}
}

func TestScaleLabSize(t *testing.T) {
	for _, tc := range []struct {
		files int
		want  string
	}{
		{20_000, "4G"}, // the lab's default is enough
		{200_000, "5G"},
		{1_000_000, "23G"}, // 1.5M inodes at ext4's 16 KiB each
	} {
		if got := scaleLabSize(tc.files); got != tc.want {
			t.Errorf("scaleLabSize(%d) = %s, want %s", tc.files, got, tc.want)
		}
	}
}

func TestStatusKiB(t *testing.T) {
	status := "Name:\tduet\nVmPeak:\t 1300000 kB\nVmHWM:\t  262144 kB\nVmRSS:\t   65536 kB\nThreads:\t12\n"
	for _, tc := range []struct {
		status, field string
		want          int64
		ok            bool
	}{
		{status, "VmHWM", 262144, true},
		{status, "VmRSS", 65536, true},
		{status, "VmSwap", 0, false},  // absent
		{status, "Threads", 0, false}, // not in kB
		{"VmRSS:\t12 MB\n", "VmRSS", 0, false},
		{"VmRSS:\tx kB\n", "VmRSS", 0, false},
	} {
		got, err := statusKiB(tc.status, tc.field)
		if got != tc.want || (err == nil) != tc.ok {
			t.Errorf("statusKiB(%q, %s) = %d, %v; want %d, ok %v", tc.status, tc.field, got, err, tc.want, tc.ok)
		}
	}
}

func TestQuantile(t *testing.T) {
	v := make([]float64, 100)
	for i := range v {
		v[i] = float64(100 - i) // 100 down to 1
	}
	for _, tc := range []struct{ q, want float64 }{{0, 1}, {0.5, 51}, {0.99, 100}, {1, 100}} {
		if got := quantile(v, tc.q); got != tc.want {
			t.Errorf("quantile(1..100, %v) = %v, want %v", tc.q, got, tc.want)
		}
	}
	if got := median([]float64{3, 1, 2}); got != 2 {
		t.Errorf("median(3, 1, 2) = %v, want 2", got)
	}
}
