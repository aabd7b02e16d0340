//! Conversion between [`ModelSpec`] and the metadata FlatBuffer (`schema/model.fbs`).
//!
//! Decoding runs on a buffer the FlatBuffers verifier has accepted; it still rejects values the
//! verifier cannot know about (unknown enum values, a union with no member, a pickcat with two
//! vocabularies) with [`FormatError::Invalid`].

use flatbuffers::{FlatBufferBuilder, WIPOffset};
use rankd_feature_ops::{FeatureSpec, FeatureType, RawFeature, SlotSpec, Transform, Vocabulary};

use crate::error::{FormatError, Result};
use crate::gen::rankd::fb;
use crate::spec::{
    Activation, Architecture, BlobRef, Cross, CrossLayer, CrossStructure, DenseLayer,
    EmbeddingTable, Expert, Head, Metadata, ModelSpec, MultiTask, Pooling, WeightType, Wide,
    WideSlot,
};

fn invalid(msg: String) -> FormatError {
    FormatError::Invalid(msg)
}

fn fb_type(t: FeatureType) -> fb::FeatureType {
    match t {
        FeatureType::Float => fb::FeatureType::Float,
        FeatureType::Int => fb::FeatureType::Int,
        FeatureType::String => fb::FeatureType::String,
        FeatureType::IntList => fb::FeatureType::IntList,
        FeatureType::StringList => fb::FeatureType::StringList,
    }
}

fn blob(b: BlobRef) -> fb::BlobRef {
    fb::BlobRef::new(b.offset, b.len)
}

fn strings<'b>(
    fbb: &mut FlatBufferBuilder<'b>,
    v: &[String],
) -> WIPOffset<flatbuffers::Vector<'b, flatbuffers::ForwardsUOffset<&'b str>>> {
    let offs: Vec<_> = v.iter().map(|s| fbb.create_string(s)).collect();
    fbb.create_vector(&offs)
}

/// Encodes `spec` as a finished, identified FlatBuffer.
pub fn encode(spec: &ModelSpec) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::with_capacity(4096);

    // Metadata.
    let m = &spec.metadata;
    let metrics: Vec<_> = m
        .metrics
        .iter()
        .map(|(k, v)| {
            let name = fbb.create_string(k);
            fb::Metric::create(
                &mut fbb,
                &fb::MetricArgs {
                    name: Some(name),
                    value: *v,
                },
            )
        })
        .collect();
    let metrics = fbb.create_vector(&metrics);
    let properties: Vec<_> = m
        .properties
        .iter()
        .map(|(k, v)| {
            let key = fbb.create_string(k);
            let value = fbb.create_string(v);
            fb::KeyValue::create(
                &mut fbb,
                &fb::KeyValueArgs {
                    key: Some(key),
                    value: Some(value),
                },
            )
        })
        .collect();
    let properties = fbb.create_vector(&properties);
    let name = fbb.create_string(&m.name);
    let producer = fbb.create_string(&m.producer);
    let metadata = fb::Metadata::create(
        &mut fbb,
        &fb::MetadataArgs {
            name: Some(name),
            version: m.version,
            created_unix_ms: m.created_unix_ms,
            producer: Some(producer),
            metrics: Some(metrics),
            properties: Some(properties),
        },
    );

    // Feature spec.
    let f = &spec.features;
    let features: Vec<_> = f
        .features
        .iter()
        .map(|rf| {
            let name = fbb.create_string(&rf.name);
            fb::RawFeature::create(
                &mut fbb,
                &fb::RawFeatureArgs {
                    name: Some(name),
                    type_: fb_type(rf.ty),
                },
            )
        })
        .collect();
    let features = fbb.create_vector(&features);
    let mut slots = Vec::with_capacity(f.slots.len());
    for s in &f.slots {
        let (ty, t): (fb::Transform, WIPOffset<flatbuffers::UnionWIPOffset>) = match &s.transform {
            Transform::Piecewise { input, boundaries } => {
                let input = fbb.create_string(input);
                let boundaries = fbb.create_vector(boundaries);
                let t = fb::Piecewise::create(
                    &mut fbb,
                    &fb::PiecewiseArgs {
                        input: Some(input),
                        boundaries: Some(boundaries),
                    },
                );
                (fb::Transform::Piecewise, t.as_union_value())
            }
            Transform::Pickcat {
                input,
                vocabulary,
                oov_buckets,
            } => {
                let input = fbb.create_string(input);
                let (ints, strs) = match vocabulary {
                    Vocabulary::Int(v) => (Some(fbb.create_vector(v)), None),
                    Vocabulary::Str(v) => (None, Some(strings(&mut fbb, v))),
                };
                let t = fb::Pickcat::create(
                    &mut fbb,
                    &fb::PickcatArgs {
                        input: Some(input),
                        int_vocabulary: ints,
                        str_vocabulary: strs,
                        oov_buckets: *oov_buckets,
                    },
                );
                (fb::Transform::Pickcat, t.as_union_value())
            }
            Transform::Descartes { inputs } => {
                let inputs = strings(&mut fbb, inputs);
                let t = fb::Descartes::create(
                    &mut fbb,
                    &fb::DescartesArgs {
                        inputs: Some(inputs),
                    },
                );
                (fb::Transform::Descartes, t.as_union_value())
            }
            Transform::Combinehash { inputs, buckets } => {
                let inputs = strings(&mut fbb, inputs);
                let t = fb::Combinehash::create(
                    &mut fbb,
                    &fb::CombinehashArgs {
                        inputs: Some(inputs),
                        buckets: *buckets,
                    },
                );
                (fb::Transform::Combinehash, t.as_union_value())
            }
            Transform::Normalize {
                input,
                mean,
                std,
                clip,
                log1p,
            } => {
                let input = fbb.create_string(input);
                let t = fb::Normalize::create(
                    &mut fbb,
                    &fb::NormalizeArgs {
                        input: Some(input),
                        mean: *mean,
                        std_: *std,
                        has_clip: clip.is_some(),
                        clip: clip.unwrap_or(0.0),
                        log1p: *log1p,
                    },
                );
                (fb::Transform::Normalize, t.as_union_value())
            }
            Transform::Hash { input, buckets } => {
                let input = fbb.create_string(input);
                let t = fb::Hash::create(
                    &mut fbb,
                    &fb::HashArgs {
                        input: Some(input),
                        buckets: *buckets,
                    },
                );
                (fb::Transform::Hash, t.as_union_value())
            }
            Transform::Prefix {
                input,
                length,
                buckets,
            } => {
                let input = fbb.create_string(input);
                let t = fb::Prefix::create(
                    &mut fbb,
                    &fb::PrefixArgs {
                        input: Some(input),
                        length: *length,
                        buckets: *buckets,
                    },
                );
                (fb::Transform::Prefix, t.as_union_value())
            }
        };
        let name = fbb.create_string(&s.name);
        slots.push(fb::Slot::create(
            &mut fbb,
            &fb::SlotArgs {
                name: Some(name),
                transform_type: ty,
                transform: Some(t),
            },
        ));
    }
    let slots = fbb.create_vector(&slots);
    let feature_spec = fb::FeatureSpec::create(
        &mut fbb,
        &fb::FeatureSpecArgs {
            hash_seed: f.hash_seed,
            features: Some(features),
            slots: Some(slots),
        },
    );

    // Architecture.
    let a = &spec.architecture;
    let embeddings: Vec<_> = a
        .embeddings
        .iter()
        .map(|e| {
            let slot = fbb.create_string(&e.slot);
            fb::EmbeddingTable::create(
                &mut fbb,
                &fb::EmbeddingTableArgs {
                    slot: Some(slot),
                    rows: e.rows,
                    dim: e.dim,
                    pooling: match e.pooling {
                        Pooling::Sum => fb::Pooling::Sum,
                        Pooling::Mean => fb::Pooling::Mean,
                    },
                    weights: Some(&blob(e.weights)),
                    weight_type: match e.weight_type {
                        WeightType::F32 => fb::WeightType::F32,
                        WeightType::F16 => fb::WeightType::F16,
                        WeightType::I8 => fb::WeightType::I8,
                    },
                    scales: e.scales.map(blob).as_ref(),
                },
            )
        })
        .collect();
    let embeddings = fbb.create_vector(&embeddings);
    let dense_inputs = strings(&mut fbb, &a.dense_inputs);
    let wide = a.wide.as_ref().map(|w| {
        let slots: Vec<_> = w
            .slots
            .iter()
            .map(|s| {
                let slot = fbb.create_string(&s.slot);
                fb::WideSlot::create(
                    &mut fbb,
                    &fb::WideSlotArgs {
                        slot: Some(slot),
                        weights: Some(&blob(s.weights)),
                    },
                )
            })
            .collect();
        let slots = fbb.create_vector(&slots);
        fb::Wide::create(
            &mut fbb,
            &fb::WideArgs {
                slots: Some(slots),
                bias: w.bias,
            },
        )
    });
    let deep: Vec<_> = a.deep.iter().map(|l| dense_layer(&mut fbb, l)).collect();
    let deep = fbb.create_vector(&deep);
    let cross = a.cross.as_ref().map(|c| {
        let layers: Vec<_> = c
            .layers
            .iter()
            .map(|l| {
                fb::CrossLayer::create(
                    &mut fbb,
                    &fb::CrossLayerArgs {
                        dim: l.dim,
                        rank: l.rank,
                        weight: l.weight.map(blob).as_ref(),
                        u: l.u.map(blob).as_ref(),
                        v: l.v.map(blob).as_ref(),
                        bias: Some(&blob(l.bias)),
                    },
                )
            })
            .collect();
        let layers = fbb.create_vector(&layers);
        fb::Cross::create(
            &mut fbb,
            &fb::CrossArgs {
                layers: Some(layers),
                structure: match c.structure {
                    CrossStructure::Stacked => fb::CrossStructure::Stacked,
                    CrossStructure::Parallel => fb::CrossStructure::Parallel,
                },
                output: c.output.map(blob).as_ref(),
            },
        )
    });
    let multitask = a.multitask.as_ref().map(|m| {
        let experts: Vec<_> = m
            .experts
            .iter()
            .map(|e| {
                let layers: Vec<_> = e.layers.iter().map(|l| dense_layer(&mut fbb, l)).collect();
                let layers = fbb.create_vector(&layers);
                fb::Expert::create(
                    &mut fbb,
                    &fb::ExpertArgs {
                        layers: Some(layers),
                    },
                )
            })
            .collect();
        let experts = fbb.create_vector(&experts);
        let heads: Vec<_> = m
            .heads
            .iter()
            .map(|h| {
                let name = fbb.create_string(&h.name);
                let gate = h.gate.as_ref().map(|g| dense_layer(&mut fbb, g));
                let tower: Vec<_> = h.tower.iter().map(|l| dense_layer(&mut fbb, l)).collect();
                let tower = fbb.create_vector(&tower);
                fb::Head::create(
                    &mut fbb,
                    &fb::HeadArgs {
                        name: Some(name),
                        gate,
                        tower: Some(tower),
                    },
                )
            })
            .collect();
        let heads = fbb.create_vector(&heads);
        fb::MultiTask::create(
            &mut fbb,
            &fb::MultiTaskArgs {
                experts: Some(experts),
                heads: Some(heads),
            },
        )
    });
    let architecture = fb::Architecture::create(
        &mut fbb,
        &fb::ArchitectureArgs {
            embeddings: Some(embeddings),
            dense_inputs: Some(dense_inputs),
            wide,
            deep: Some(deep),
            fm: a.fm,
            cross,
            multitask,
        },
    );
    let model = fb::Model::create(
        &mut fbb,
        &fb::ModelArgs {
            metadata: Some(metadata),
            features: Some(feature_spec),
            architecture: Some(architecture),
        },
    );
    fb::finish_model_buffer(&mut fbb, model);
    fbb.finished_data().to_vec()
}

fn own_strings(v: flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<&str>>) -> Vec<String> {
    v.iter().map(str::to_owned).collect()
}

fn own_blob(b: &fb::BlobRef) -> BlobRef {
    BlobRef {
        offset: b.offset(),
        len: b.len(),
    }
}

/// Decodes a verified model FlatBuffer.
pub fn decode(model: fb::Model<'_>) -> Result<ModelSpec> {
    let m = model.metadata();
    let metadata = Metadata {
        name: m.name().to_owned(),
        version: m.version(),
        created_unix_ms: m.created_unix_ms(),
        producer: m.producer().to_owned(),
        metrics: m
            .metrics()
            .map(|v| v.iter().map(|x| (x.name().to_owned(), x.value())).collect())
            .unwrap_or_default(),
        properties: m
            .properties()
            .map(|v| {
                v.iter()
                    .map(|x| (x.key().to_owned(), x.value().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
    };

    let f = model.features();
    let mut features = Vec::with_capacity(f.features().len());
    for rf in f.features() {
        let ty = match rf.type_() {
            fb::FeatureType::Float => FeatureType::Float,
            fb::FeatureType::Int => FeatureType::Int,
            fb::FeatureType::String => FeatureType::String,
            fb::FeatureType::IntList => FeatureType::IntList,
            fb::FeatureType::StringList => FeatureType::StringList,
            other => {
                return Err(invalid(format!(
                    "raw feature `{}` has unknown type {}",
                    rf.name(),
                    other.0
                )))
            }
        };
        features.push(RawFeature {
            name: rf.name().to_owned(),
            ty,
        });
    }
    let mut slots = Vec::with_capacity(f.slots().len());
    for s in f.slots() {
        let name = s.name();
        let missing = || invalid(format!("slot `{name}` has no transform"));
        let transform = match s.transform_type() {
            fb::Transform::Piecewise => {
                let t = s.transform_as_piecewise().ok_or_else(missing)?;
                Transform::Piecewise {
                    input: t.input().to_owned(),
                    boundaries: t.boundaries().iter().collect(),
                }
            }
            fb::Transform::Pickcat => {
                let t = s.transform_as_pickcat().ok_or_else(missing)?;
                let vocabulary = match (t.int_vocabulary(), t.str_vocabulary()) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(format!(
                            "slot `{name}` has both an integer and a string vocabulary"
                        )))
                    }
                    (Some(v), None) => Vocabulary::Int(v.iter().collect()),
                    (None, Some(v)) => Vocabulary::Str(own_strings(v)),
                    (None, None) => Vocabulary::Int(Vec::new()),
                };
                Transform::Pickcat {
                    input: t.input().to_owned(),
                    vocabulary,
                    oov_buckets: t.oov_buckets(),
                }
            }
            fb::Transform::Descartes => {
                let t = s.transform_as_descartes().ok_or_else(missing)?;
                Transform::Descartes {
                    inputs: own_strings(t.inputs()),
                }
            }
            fb::Transform::Combinehash => {
                let t = s.transform_as_combinehash().ok_or_else(missing)?;
                Transform::Combinehash {
                    inputs: own_strings(t.inputs()),
                    buckets: t.buckets(),
                }
            }
            fb::Transform::Normalize => {
                let t = s.transform_as_normalize().ok_or_else(missing)?;
                Transform::Normalize {
                    input: t.input().to_owned(),
                    mean: t.mean(),
                    std: t.std_(),
                    clip: t.has_clip().then(|| t.clip()),
                    log1p: t.log1p(),
                }
            }
            fb::Transform::Hash => {
                let t = s.transform_as_hash().ok_or_else(missing)?;
                Transform::Hash {
                    input: t.input().to_owned(),
                    buckets: t.buckets(),
                }
            }
            fb::Transform::Prefix => {
                let t = s.transform_as_prefix().ok_or_else(missing)?;
                Transform::Prefix {
                    input: t.input().to_owned(),
                    length: t.length(),
                    buckets: t.buckets(),
                }
            }
            other => {
                return Err(invalid(format!(
                    "slot `{name}` has unknown transform type {}",
                    other.0
                )))
            }
        };
        slots.push(SlotSpec {
            name: name.to_owned(),
            transform,
        });
    }
    let feature_spec = FeatureSpec {
        hash_seed: f.hash_seed(),
        features,
        slots,
    };

    let a = model.architecture();
    let mut embeddings = Vec::with_capacity(a.embeddings().len());
    for e in a.embeddings() {
        let pooling = match e.pooling() {
            fb::Pooling::Sum => Pooling::Sum,
            fb::Pooling::Mean => Pooling::Mean,
            other => {
                return Err(invalid(format!(
                    "embedding `{}` has unknown pooling {}",
                    e.slot(),
                    other.0
                )))
            }
        };
        let weight_type = match e.weight_type() {
            fb::WeightType::F32 => WeightType::F32,
            fb::WeightType::F16 => WeightType::F16,
            fb::WeightType::I8 => WeightType::I8,
            other => {
                return Err(invalid(format!(
                    "embedding `{}` has unknown weight type {} (a newer writer?)",
                    e.slot(),
                    other.0
                )))
            }
        };
        embeddings.push(EmbeddingTable {
            slot: e.slot().to_owned(),
            rows: e.rows(),
            dim: e.dim(),
            pooling,
            weights: own_blob(e.weights()),
            weight_type,
            scales: e.scales().map(own_blob),
        });
    }
    let wide = a.wide().map(|w| Wide {
        slots: w
            .slots()
            .iter()
            .map(|s| WideSlot {
                slot: s.slot().to_owned(),
                weights: own_blob(s.weights()),
            })
            .collect(),
        bias: w.bias(),
    });
    let layers = |v: flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::DenseLayer<'_>>>,
                  what: &dyn Fn(usize) -> String|
     -> Result<Vec<DenseLayer>> {
        v.iter()
            .enumerate()
            .map(|(i, l)| own_layer(l, &what(i)))
            .collect()
    };
    let deep = layers(a.deep(), &|i| format!("deep layer {i}"))?;
    let cross = match a.cross() {
        None => None,
        Some(c) => Some(Cross {
            layers: c
                .layers()
                .iter()
                .map(|l| CrossLayer {
                    dim: l.dim(),
                    rank: l.rank(),
                    weight: l.weight().map(own_blob),
                    u: l.u().map(own_blob),
                    v: l.v().map(own_blob),
                    bias: own_blob(l.bias()),
                })
                .collect(),
            structure: match c.structure() {
                fb::CrossStructure::Stacked => CrossStructure::Stacked,
                fb::CrossStructure::Parallel => CrossStructure::Parallel,
                other => return Err(invalid(format!("unknown cross structure {}", other.0))),
            },
            output: c.output().map(own_blob),
        }),
    };
    let multitask = match a.multitask() {
        None => None,
        Some(m) => {
            let mut experts = Vec::with_capacity(m.experts().len());
            for (k, e) in m.experts().iter().enumerate() {
                experts.push(Expert {
                    layers: layers(e.layers(), &|i| format!("expert {k} layer {i}"))?,
                });
            }
            let mut heads = Vec::with_capacity(m.heads().len());
            for h in m.heads().iter() {
                let name = h.name();
                heads.push(Head {
                    name: name.to_owned(),
                    gate: h
                        .gate()
                        .map(|g| own_layer(g, &format!("head `{name}` gate")))
                        .transpose()?,
                    tower: layers(h.tower(), &|i| format!("head `{name}` tower layer {i}"))?,
                });
            }
            Some(MultiTask { experts, heads })
        }
    };
    let architecture = Architecture {
        embeddings,
        dense_inputs: own_strings(a.dense_inputs()),
        wide,
        deep,
        fm: a.fm(),
        cross,
        multitask,
    };
    Ok(ModelSpec {
        metadata,
        features: feature_spec,
        architecture,
    })
}

fn dense_layer<'a>(
    fbb: &mut flatbuffers::FlatBufferBuilder<'a>,
    l: &DenseLayer,
) -> flatbuffers::WIPOffset<fb::DenseLayer<'a>> {
    fb::DenseLayer::create(
        fbb,
        &fb::DenseLayerArgs {
            in_dim: l.in_dim,
            out_dim: l.out_dim,
            activation: match l.activation {
                Activation::None => fb::Activation::None,
                Activation::Relu => fb::Activation::Relu,
            },
            weight: Some(&blob(l.weight)),
            bias: Some(&blob(l.bias)),
        },
    )
}

fn own_layer(l: fb::DenseLayer<'_>, what: &str) -> Result<DenseLayer> {
    let activation = match l.activation() {
        fb::Activation::None => Activation::None,
        fb::Activation::Relu => Activation::Relu,
        other => {
            return Err(invalid(format!(
                "{what} has unknown activation {}",
                other.0
            )))
        }
    };
    Ok(DenseLayer {
        in_dim: l.in_dim(),
        out_dim: l.out_dim(),
        activation,
        weight: own_blob(l.weight()),
        bias: own_blob(l.bias()),
    })
}
