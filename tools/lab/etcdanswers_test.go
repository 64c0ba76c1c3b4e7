package lab

import (
	"strings"
	"testing"
)

// etcdctl's answers, as etcdctl 3.x printed them for kine v0.17.5: a get
// -w json of a key that exists and of one that does not, and txn's two
// outcomes.
func TestEtcdctlAnswers(t *testing.T) {
	v, rev, err := parseEtcdGet([]byte(`{"header":{"revision":141283},"kvs":[{"key":"L3IvdzM=","create_revision":4345,"mod_revision":141249,"value":"dzMtMTA4MA=="}],"count":1}`))
	if v != "w3-1080" || rev != 141249 || err != nil {
		t.Errorf("get of an existing key: %q, %d, %v; want \"w3-1080\", 141249", v, rev, err)
	}
	v, rev, err = parseEtcdGet([]byte(`{"header":{"revision":141283}}`))
	if v != "" || rev != 0 || err != nil {
		t.Errorf("get of a missing key: %q, %d, %v; want \"\", 0", v, rev, err)
	}
	// Anything else tells nothing: the get's outcome is unknown.
	for _, bad := range []string{"", "OK", `{"kvs":[]}`, `{"header":{},"kvs":[{"mod_revision":0,"value":"eA=="}]}`,
		`{"header":{},"kvs":[{"mod_revision":3,"value":""}]}`, `{"header":{},"kvs":[{"mod_revision":3,"value":"eA=="},{"mod_revision":4,"value":"eA=="}]}`} {
		if _, _, err := parseEtcdGet([]byte(bad)); err == nil {
			t.Errorf("get answered %q: no error", bad)
		}
	}
	for out, want := range map[string]bool{"SUCCESS\n\nOK\n": true, "FAILURE\n\n/r/w3\nw3-1080\n": false} {
		if ok, err := parseEtcdTxn([]byte(out)); ok != want || err != nil {
			t.Errorf("txn answered %q: %v, %v; want %v", out, ok, err, want)
		}
	}
	if _, err := parseEtcdTxn([]byte("Error: context deadline exceeded\n")); err == nil {
		t.Error("txn answered an error: no error")
	}
}

// The two transactions kine serves: a create compares the revision with 0
// and does nothing on failure; an update gets the key on failure.
func TestEtcdTxnShapes(t *testing.T) {
	create := etcdTxn("/lin/k0", "c1-2", 0)
	if create != "mod(\"/lin/k0\") = \"0\"\n\nput /lin/k0 c1-2\n\n\n" {
		t.Errorf("create: %q", create)
	}
	update := etcdTxn("/lin/k0", "c1-3", 57)
	if update != "mod(\"/lin/k0\") = \"57\"\n\nput /lin/k0 c1-3\n\nget /lin/k0\n\n" {
		t.Errorf("update: %q", update)
	}
	if strings.Count(update, "\n\n") != 3 {
		t.Errorf("update %q: want three sections, each ended by a blank line", update)
	}
}
