package node

import (
	"encoding/json"
	"maps"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"gopkg.in/yaml.v3"
)

// The alert rules and the dashboard shipped in deploy/ (see the README's
// Monitoring section).
const (
	alertsFile    = "../../deploy/prometheus/duet-alerts.yml"
	dashboardFile = "../../deploy/grafana/duet-dashboard.json"
)

// metricRef is a metric name as a query spells it: ours, the process's
// and the Go runtime's.
var metricRef = regexp.MustCompile(`\b(?:duet|process|go)_[a-z0-9_]+\b`)

// sampleNames are the names a query can use for the families scraped: a
// histogram's are its _bucket, _sum and _count series.
func sampleNames(fams map[string]*dto.MetricFamily) map[string]bool {
	names := map[string]bool{}
	for name, f := range fams {
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM:
			names[name+"_bucket"], names[name+"_sum"], names[name+"_count"] = true, true, true
		case dto.MetricType_SUMMARY:
			names[name], names[name+"_sum"], names[name+"_count"] = true, true, true
		default:
			names[name] = true
		}
	}
	return names
}

// queries returns the PromQL of the rule file or the dashboard: the
// values of its expr, query and definition keys, at any depth.
func queries(t *testing.T, file string) []string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var doc any
	if strings.HasSuffix(file, ".json") {
		err = json.Unmarshal(b, &doc)
	} else {
		err = yaml.Unmarshal(b, &doc)
	}
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	var out []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || k == "query" || k == "definition") {
					out = append(out, s)
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(doc)
	return out
}

// unknown returns the metric names in texts that are not in known.
func unknown(texts []string, known map[string]bool) []string {
	var out []string
	for _, s := range texts {
		for _, r := range metricRef.FindAllString(s, -1) {
			if !known[r] && !slices.Contains(out, r) {
				out = append(out, r)
			}
		}
	}
	sort.Strings(out)
	return out
}

// TestMonitoringUsesExportedMetrics fails when the alert rules or the
// dashboard query a metric that a node does not export (renamed,
// removed, misspelled): the alert would never fire, the panel stay empty.
// Their prose may also name a histogram by its family name.
func TestMonitoringUsesExportedMetrics(t *testing.T) {
	fams := families(t, newMetrics(serving))
	samples := sampleNames(fams)
	named := maps.Clone(samples)
	for name := range fams {
		named[name] = true
	}
	for _, file := range []string{alertsFile, dashboardFile} {
		qs := queries(t, file)
		if len(qs) == 0 || len(unknown(qs, nil)) == 0 {
			t.Fatalf("%s: no query with a metric found", file)
		}
		if missing := unknown(qs, samples); len(missing) > 0 {
			t.Errorf("%s: queries use metrics no node exports: %v", file, missing)
		}
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		if missing := unknown([]string{string(b)}, named); len(missing) > 0 {
			t.Errorf("%s: names metrics no node exports: %v", file, missing)
		}
	}
}

// alertRules is the part of a Prometheus rule file checked here.
type alertRules struct {
	Groups []struct {
		Rules []struct {
			Alert       string            `yaml:"alert"`
			Expr        string            `yaml:"expr"`
			For         string            `yaml:"for"`
			Annotations map[string]string `yaml:"annotations"`
		} `yaml:"rules"`
	} `yaml:"groups"`
}

// TestAlertRules checks that each alert the operators rely on is there
// and tells them what happened and what to do.
func TestAlertRules(t *testing.T) {
	b, err := os.ReadFile(alertsFile)
	if err != nil {
		t.Fatal(err)
	}
	var rules alertRules
	if err := yaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("%s: %v", alertsFile, err)
	}
	got := map[string]string{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
				t.Errorf("%s: %s lacks a summary or a description", alertsFile, r.Alert)
			}
			got[r.Alert] = r.For
		}
	}
	for _, name := range []string{"DuetPeerLost", "DuetReplicationLagHigh", "DuetNotInSync", "DuetResyncStalled",
		"DuetServiceUnhealthy", "DuetRingOverflow", "DuetFsyncStall"} {
		if _, ok := got[name]; !ok {
			t.Errorf("%s: no alert %s", alertsFile, name)
		}
	}
	if got["DuetNotInSync"] != "10m" {
		t.Errorf("%s: DuetNotInSync fires after %q, want 10m", alertsFile, got["DuetNotInSync"])
	}
}

// TestDashboard checks that the dashboard is JSON Grafana imports: panels
// with queries, over a Prometheus data source chosen at import.
func TestDashboard(t *testing.T) {
	b, err := os.ReadFile(dashboardFile)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Title  string `json:"title"`
		UID    string `json:"uid"`
		Panels []struct {
			Title   string `json:"title"`
			Type    string `json:"type"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name string `json:"name"`
				Type string `json:"type"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	if d.Title == "" || d.UID == "" || len(d.Panels) == 0 {
		t.Fatalf("%s: title %q, uid %q, %d panels: want all three", dashboardFile, d.Title, d.UID, len(d.Panels))
	}
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("%s: panel %q has no query", dashboardFile, p.Title)
		}
		for _, q := range p.Targets {
			if q.Expr == "" {
				t.Errorf("%s: panel %q has an empty query", dashboardFile, p.Title)
			}
		}
	}
	if !slices.ContainsFunc(d.Templating.List, func(v struct {
		Name string `json:"name"`
		Type string `json:"type"`
	}) bool {
		return v.Name == "datasource" && v.Type == "datasource"
	}) {
		t.Errorf("%s: no datasource variable: the panels' ${datasource} would not resolve", dashboardFile)
	}
}
