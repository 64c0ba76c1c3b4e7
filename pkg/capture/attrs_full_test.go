package capture

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/duet-ha/duet/pkg/loopfs"
)

// TestAttrMarksFullChangeNotSilent: every inode whose ATTR record has not
// been taken by a build pass keeps its mark in the attrs map (65 536
// entries). A primary whose peer is away (no passes run: forgetLoop drops
// chunk marks only), one in a resync, or one held back by maxUnacked,
// keeps one mark per inode changed on the filesystem (inside the tree or
// not). Once 65 536 are held, emit_attr's insert fails with E2BIG and it
// returns: no record, no overflow mark, no lost count. A chmod of any
// other file is then in no record, no journal, no bitmap, and no rescan.
// From a review of d2087e5 (failed on it). Only a mark already there now
// spares a record: a full map reports the change without one.
func TestAttrMarksFullChangeNotSilent(t *testing.T) {
	// 500 MiB (sparse): mkfs's "small" type, one inode per 4 KiB: 128 000.
	fs := loopfs.Make(t, "ext4", 500)
	victim := filepath.Join(fs.Mount, "victim")
	if err := os.WriteFile(victim, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	var vst syscall.Stat_t
	if err := syscall.Stat(victim, &vst); err != nil {
		t.Fatal(err)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Devices: []uint64{st.Dev}})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	// Records are read (as a primary's dispatcher does) but no pass
	// takes them: their ATTR marks stay.
	var recs []Record
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			var r Record
			if err := c.Read(&r); err != nil {
				return
			}
			recs = append(recs, r)
		}
	}()
	dir := filepath.Join(fs.Mount, "many")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	const n = 66000
	for i := 0; i < n; i++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprint(i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	// The change under test: metadata only, on a file with no mark.
	if err := os.Chmod(victim, 0o600); err != nil {
		t.Fatal(err)
	}
	// Let the reader catch up, then stop it.
	for i := 0; i < 100; i++ {
		if c.Buffered() == 0 {
			break
		}
		syscallSleep()
	}
	syscallSleep()
	c.StopReading()
	<-done
	ctr, _ := c.Counters()
	over, _ := c.TakeOverflow()
	seen := false
	for _, r := range recs {
		if r.Ino == vst.Ino && r.Kind == KindAttr {
			seen = true
		}
	}
	inOverflow := false
	for _, k := range over {
		if k.Ino == vst.Ino {
			inOverflow = true
		}
	}
	t.Logf("records read %d, counters %+v, overflow marks %d", len(recs), ctr, len(over))
	if !seen && !inOverflow && ctr.Rescan == 0 {
		t.Fatalf("chmod of inode %d after %d files were created: no ATTR record, no overflow mark, "+
			"lost=%d rescan=%d: the change is lost silently (attrs map full)", vst.Ino, n, ctr.Lost, ctr.Rescan)
	}
}

func syscallSleep() {
	ts := syscall.Timespec{Nsec: 50e6}
	syscall.Nanosleep(&ts, nil)
}
