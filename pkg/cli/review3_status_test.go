package cli

import (
	"bytes"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/node"
)

// TestKeptRoleStatusSaysWhatMovesIt: a node that kept the role with a
// failed service (no peer in sync) hands it over by itself once the peer
// is SECOND in sync (cluster.Machine.ServiceDown). Its status line says
// only "no peer in sync could take it": nothing tells the operator that
// starting or resyncing the peer moves the role (a surprise failover,
// possibly hours later), nor, when the peer is marked, that `duet stop`
// and `duet start` on the peer do too. (From a third review; it failed
// on c3a547d.)
func TestKeptRoleStatusSaysWhatMovesIt(t *testing.T) {
	st := node.Status{Node: "nodeB", State: "ALONE", ServiceDown: "mariadb: exited 1"}
	var out bytes.Buffer
	if err := printStatus(&out, &st, "text"); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "in sync") || !strings.Contains(out.String(), "moves") {
		t.Errorf("the keeper's status does not say the role moves once the peer is in sync:\n%s", out.String())
	}
}
