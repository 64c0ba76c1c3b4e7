package node

import (
	"context"
	"time"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/replica"
)

// The capture keeps in-flight marks in the kernel: while an inode has an
// attribute mark, or a chunk a data mark, their changes emit no record, a
// record being already on its way. Only user space deletes a mark, when
// it takes the change (replica: a pass or a resync forgets the marks of
// what it took before reading). A mark left set with nothing to forget it
// silences its inode for the rest of the term, and no durability call or
// status can tell: the thirty-seventh session's unexplained divergence was
// such a mark (a resync cut at its start, TestResyncCutAtStartLeavesMarksStuck).
// auditMarks looks for them while the capture is quiet, says so, and
// repairs what it finds: the marks forgotten, their inodes rescanned.

// markAuditEvery spaces the audits; markAuditSettle is how long the
// capture must stay quiet around one.
const (
	markAuditEvery  = 10 * time.Second
	markAuditSettle = 100 * time.Millisecond
)

// StuckMarksMsg begins the log message of an audit that found stuck marks
// (the lab fails any test whose daemon logged it).
const StuckMarksMsg = "capture marks found set with nothing left to forget them"

// marksSource is what the audit needs of the capture.
type marksSource interface {
	Counters() (capture.Counters, error)
	Marks() ([]capture.InodeKey, []capture.CaptureChunkKey, error)
	ForgetAttr(capture.InodeKey)
	ForgetChunks([]capture.CaptureChunkKey) error
}

// auditMarks runs auditMarksOnce every markAuditEvery until ctx ends.
func (n *Node) auditMarks(ctx context.Context, c marksSource, drain func() error, primaries []*replica.Primary) {
	t := time.NewTicker(markAuditEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n.auditMarksOnce(ctx, c, drain, primaries)
	}
}

// auditMarksOnce finds the marks set with nothing left to forget them, and
// returns their inodes, forgotten and rescanned. It looks only when the
// capture is quiet: every record emitted is in the primaries' hands
// (drain), each has taken and forgotten all it got (Quiet: journal empty,
// no pass or resync running), and the capture emitted and lost nothing
// from before the drain until markAuditSettle after the marks were read
// (a program between setting a mark and counting its record is done by
// then). Every mark there is then stuck. On a busy filesystem it rarely
// finds such a moment, and looks again later.
func (n *Node) auditMarksOnce(ctx context.Context, c marksSource, drain func() error, primaries []*replica.Primary) []capture.InodeKey {
	quiet := func() bool {
		for _, p := range primaries {
			if !p.Quiet() {
				return false
			}
		}
		return true
	}
	if !quiet() {
		return nil // busy: no drain for nothing
	}
	before, err := c.Counters()
	if err != nil || drain() != nil || !quiet() {
		return nil
	}
	attrs, chunks, err := c.Marks()
	if err != nil {
		return nil
	}
	if len(attrs)+len(chunks) == 0 {
		n.marksAudited.Add(1) // quiet, and nothing stuck
		return nil
	}
	select {
	case <-ctx.Done():
		return nil
	case <-time.After(markAuditSettle):
	}
	after, err := c.Counters()
	if err != nil || after.Seq != before.Seq || after.Lost != before.Lost || !quiet() {
		return nil
	}
	n.marksAudited.Add(1)
	seen := map[capture.InodeKey]bool{}
	var inodes []capture.InodeKey
	add := func(k capture.InodeKey) {
		if !seen[k] {
			seen[k] = true
			inodes = append(inodes, k)
		}
	}
	for _, k := range attrs {
		c.ForgetAttr(k)
		add(k)
	}
	c.ForgetChunks(chunks) // moves the forget epoch too (btrfs)
	for _, k := range chunks {
		add(capture.InodeKey{Dev: k.Dev, Ino: k.Ino})
	}
	n.log.Error(StuckMarksMsg+": those files' changes were not captured since (a bug, please report it); forgotten, and the files rescanned",
		"inodes", len(inodes), "attribute_marks", len(attrs), "data_marks", len(chunks), "first_inode", inodes[0].Ino, "first_dev", inodes[0].Dev)
	// Two directories on one device both rescan (and count) them: each
	// has its own shadow of the names.
	for _, p := range primaries {
		var mine []capture.InodeKey
		for _, k := range inodes {
			if p.Dev == k.Dev {
				mine = append(mine, k)
			}
		}
		if len(mine) > 0 {
			p.StuckMarks(mine)
		}
	}
	return inodes
}
