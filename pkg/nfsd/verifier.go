package nfsd

import (
	"crypto/rand"
	"os"
	"sync"
)

// verifier is the write verifier (writeverf3) and the syncs that may
// change it. A sync that fails may have reported a write-back error that
// lost bytes written UNSTABLE, possibly through another handle or
// connection; fsync(2) reports such an error to one caller only, so the
// COMMIT of those bytes would find nothing wrong. A new verifier tells
// every client to write again what it has not committed (knfsd does the
// same).
type verifier struct {
	mu       sync.Mutex
	ended    *sync.Cond // a sync ended
	v        [8]byte
	next     uint64              // the ticket of the next sync
	inflight map[uint64]struct{} // syncs not ended
}

// newVerifier starts with a random verifier: a new one at every start,
// so that a client whose UNSTABLE writes were not committed when the
// last server stopped (or the peer took over) sees another at its
// COMMIT and sends them again.
func newVerifier() *verifier {
	v := &verifier{inflight: map[uint64]struct{}{}}
	v.ended = sync.NewCond(&v.mu)
	rand.Read(v.v[:]) // never fails (crypto/rand since Go 1.24)
	return v
}

// current is the verifier of a WRITE reply, taken before the bytes are
// written: a sync that loses them fails after, and changes it.
func (v *verifier) current() [8]byte {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.v
}

// afterSync is the verifier of a COMMIT reply, taken once its sync
// succeeded and every sync begun before has ended: one of those may have
// taken the error this one did not see, and not yet changed the
// verifier.
func (v *verifier) afterSync() [8]byte {
	v.mu.Lock()
	defer v.mu.Unlock()
	last := v.next
	for v.anyBefore(last) {
		v.ended.Wait()
	}
	return v.v
}

func (v *verifier) anyBefore(t uint64) bool {
	for k := range v.inflight {
		if k < t {
			return true
		}
	}
	return false
}

// syncer wraps s: a failed sync changes the verifier.
func (v *verifier) syncer(s Syncer) Syncer { return &verifiedSyncer{s: s, v: v} }

type verifiedSyncer struct {
	s Syncer
	v *verifier
}

func (vs *verifiedSyncer) Sync(f *os.File) error {
	v := vs.v
	v.mu.Lock()
	t := v.next
	v.next++
	v.inflight[t] = struct{}{}
	v.mu.Unlock()

	err := vs.s.Sync(f)

	v.mu.Lock()
	defer v.mu.Unlock()
	if err != nil {
		old := v.v
		for v.v == old {
			rand.Read(v.v[:])
		}
	}
	delete(v.inflight, t)
	v.ended.Broadcast()
	return err
}
