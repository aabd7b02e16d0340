// Command validate decodes Kubernetes manifests strictly into the Kubernetes API types
// (k8s.io/api) and Kubeflow's TFJob type (github.com/kubeflow/training-operator), failing on an
// unknown field, a wrong type or an unknown kind, and checks what rankd needs of them: probes on
// the admin port, a model volume, resources, a PodDisruptionBudget selecting the Deployment, PS
// and Worker replicas of a TFJob.
//
// Usage: go run . FILE.yaml...
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	kubeflow "github.com/kubeflow/training-operator/pkg/apis/kubeflow.org/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// strict decodes JSON into out, refusing unknown fields.
func strict(doc []byte, out interface{}) error {
	d := json.NewDecoder(bytes.NewReader(doc))
	d.DisallowUnknownFields()
	return d.Decode(out)
}

func object(kind string) (runtime.Object, error) {
	switch kind {
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}, nil
	case "v1/Service":
		return &corev1.Service{}, nil
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, nil
	case "policy/v1/PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, nil
	case "kubeflow.org/v1/TFJob":
		return &kubeflow.TFJob{}, nil
	}
	return nil, fmt.Errorf("kind %s is not one rankd ships", kind)
}

func checkPod(where string, spec *corev1.PodSpec, probes bool) []string {
	var bad []string
	if len(spec.Containers) == 0 {
		return []string{where + ": no containers"}
	}
	for _, c := range spec.Containers {
		if c.Image == "" {
			bad = append(bad, where+": container "+c.Name+" has no image")
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
			bad = append(bad, where+": container "+c.Name+" has no cpu request or memory limit")
		}
		if probes {
			for name, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe} {
				if p == nil || p.HTTPGet == nil || p.HTTPGet.Port.String() != "admin" {
					bad = append(bad, where+": "+name+" probe is not an HTTP GET on the admin port")
				}
			}
		}
	}
	return bad
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: validate FILE.yaml...")
		os.Exit(2)
	}
	var problems []string
	kinds := map[string]int{}
	var deployments []*appsv1.Deployment
	var pdbs []*policyv1.PodDisruptionBudget
	for _, path := range os.Args[1:] {
		f, err := os.Open(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(f))
		for n := 1; ; n++ {
			raw, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: document %d: %v", path, n, err))
				break
			}
			if strings.TrimSpace(string(raw)) == "" {
				continue
			}
			doc, err := yaml.YAMLToJSON(raw)
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: document %d: %v", path, n, err))
				continue
			}
			var tm typeMeta
			if err := json.Unmarshal(doc, &tm); err != nil || tm.Kind == "" {
				if strings.TrimSpace(string(doc)) == "null" {
					continue
				}
				problems = append(problems, fmt.Sprintf("%s: document %d: no kind", path, n))
				continue
			}
			where := fmt.Sprintf("%s: %s %d", path, tm.Kind, n)
			obj, err := object(tm.APIVersion + "/" + tm.Kind)
			if err != nil {
				problems = append(problems, where+": "+err.Error())
				continue
			}
			if err := strict(doc, obj); err != nil {
				problems = append(problems, where+": "+err.Error())
				continue
			}
			kinds[tm.Kind]++
			switch o := obj.(type) {
			case *appsv1.Deployment:
				deployments = append(deployments, o)
				problems = append(problems, checkPod(where, &o.Spec.Template.Spec, true)...)
				mounted := false
				for _, c := range o.Spec.Template.Spec.Containers {
					for _, m := range c.VolumeMounts {
						mounted = mounted || m.MountPath == "/models"
					}
				}
				if !mounted {
					problems = append(problems, where+": no model volume on /models")
				}
			case *kubeflow.TFJob:
				for _, role := range []kubeflow.ReplicaType{kubeflow.TFJobReplicaTypePS, kubeflow.TFJobReplicaTypeWorker} {
					spec, ok := o.Spec.TFReplicaSpecs[role]
					if !ok || spec.Replicas == nil || *spec.Replicas < 1 {
						problems = append(problems, where+": no "+string(role)+" replicas")
						continue
					}
					problems = append(problems, checkPod(where+" "+string(role), &spec.Template.Spec, false)...)
				}
				for role := range o.Spec.TFReplicaSpecs {
					switch role {
					case kubeflow.TFJobReplicaTypePS, kubeflow.TFJobReplicaTypeWorker, kubeflow.TFJobReplicaTypeChief:
					default:
						problems = append(problems, where+": replica type "+string(role)+" is not one rankd-train runs")
					}
				}
			case *policyv1.PodDisruptionBudget:
				pdbs = append(pdbs, o)
			}
		}
		f.Close()
	}
	for _, p := range pdbs {
		matched := false
		for _, d := range deployments {
			all := p.Spec.Selector != nil
			if all {
				for k, v := range p.Spec.Selector.MatchLabels {
					all = all && d.Spec.Template.Labels[k] == v
				}
			}
			matched = matched || all
		}
		if !matched {
			problems = append(problems, "PodDisruptionBudget "+p.Name+" selects no Deployment's pods")
		}
	}
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, p)
		}
		os.Exit(1)
	}
	fmt.Printf("valid: %v\n", kinds)
}
