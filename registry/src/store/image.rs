//! The catalog's on-disk and on-the-wire image: snapshot data.
//!
//! JSON, with every map written as a list of `[key, value]` pairs (the export map is keyed
//! by `(service, site)`, which JSON objects cannot key). Both directions name every
//! [`Catalog`] field, so adding a field to the catalog fails to compile here until the
//! image carries it. The client [`Sessions`] ride along (absent in older images: empty).

use std::collections::BTreeMap;
use std::sync::Arc;

use meshbridge_core::model::{Catalog, Export, Import, Policy, ServiceKey, Site, TokenUse};
use serde::{Deserialize, Serialize, Serializer};

use super::StoreError;
use super::sessions::Sessions;

/// Bumped on any incompatible change of the image.
const FORMAT: u32 = 1;

#[derive(Serialize)]
struct ImageRef<'a> {
    format: u32,
    revision: u64,
    sites: Pairs<'a, String, Arc<Site>>,
    exports: Pairs<'a, (ServiceKey, String), Arc<Export>>,
    imports: Pairs<'a, (ServiceKey, String), Arc<Import>>,
    policies: Pairs<'a, String, Arc<Policy>>,
    tokens: Pairs<'a, String, TokenUse>,
    export_tombstones: Pairs<'a, (ServiceKey, String), u64>,
    clock_ms: u64,
    revoked_sites: Pairs<'a, String, u64>,
    owners: Pairs<'a, String, Vec<String>>,
    sessions: &'a Sessions,
}

struct Pairs<'a, K, V>(&'a BTreeMap<K, V>);

impl<K: Serialize, V: Serialize> Serialize for Pairs<'_, K, V> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter())
    }
}

#[derive(Deserialize)]
struct Header {
    format: u32,
}

#[derive(Deserialize)]
struct Image {
    revision: u64,
    sites: Vec<(String, Arc<Site>)>,
    exports: Vec<((ServiceKey, String), Arc<Export>)>,
    #[serde(default)]
    imports: Vec<((ServiceKey, String), Arc<Import>)>,
    policies: Vec<(String, Arc<Policy>)>,
    tokens: Vec<(String, TokenUse)>,
    #[serde(default)]
    export_tombstones: Vec<((ServiceKey, String), u64)>,
    #[serde(default)]
    clock_ms: u64,
    #[serde(default)]
    revoked_sites: Vec<(String, u64)>,
    #[serde(default)]
    owners: Vec<(String, Vec<String>)>,
    #[serde(default)]
    sessions: Sessions,
}

/// Serializes the catalog and the sessions for a snapshot.
pub(super) fn encode(catalog: &Catalog, sessions: &Sessions) -> Result<Vec<u8>, StoreError> {
    let Catalog {
        revision,
        sites,
        exports,
        imports,
        policies,
        tokens,
        export_tombstones,
        clock_ms,
        revoked_sites,
        owners,
    } = catalog;
    let image = ImageRef {
        format: FORMAT,
        revision: *revision,
        sites: Pairs(sites),
        exports: Pairs(exports),
        imports: Pairs(imports),
        policies: Pairs(policies),
        tokens: Pairs(tokens),
        export_tombstones: Pairs(export_tombstones),
        clock_ms: *clock_ms,
        revoked_sites: Pairs(revoked_sites),
        owners: Pairs(owners),
        sessions,
    };
    super::encode("catalog image", &image)
}

/// Reads a catalog and the sessions from snapshot data.
pub(super) fn decode(bytes: &[u8]) -> Result<(Catalog, Sessions), StoreError> {
    let Header { format } = super::decode("catalog image header", bytes)?;
    if format != FORMAT {
        return Err(StoreError::Format {
            what: "catalog image",
            found: format,
            supported: FORMAT,
        });
    }
    let Image {
        revision,
        sites,
        exports,
        imports,
        policies,
        tokens,
        export_tombstones,
        clock_ms,
        revoked_sites,
        owners,
        sessions,
    } = super::decode("catalog image", bytes)?;
    let catalog = Catalog {
        revision,
        sites: sites.into_iter().collect(),
        exports: exports.into_iter().collect(),
        imports: imports.into_iter().collect(),
        policies: policies.into_iter().collect(),
        tokens: tokens.into_iter().collect(),
        export_tombstones: export_tombstones.into_iter().collect(),
        clock_ms,
        revoked_sites: revoked_sites.into_iter().collect(),
        owners: owners.into_iter().collect(),
    };
    Ok((catalog, sessions))
}

#[cfg(test)]
mod tests {
    use meshbridge_core::model::{Locality, Principal, SiteKind, SiteState};

    use super::*;

    #[test]
    fn catalog_survives_the_image_round_trip() {
        let service = ServiceKey::new("shop", "cart");
        let site = Site {
            name: "east".into(),
            kind: SiteKind::Cluster,
            locality: Locality {
                region: "eu".into(),
                zone: "eu-1a".into(),
            },
            gateways: vec!["10.0.0.1:15443".into()],
            lease_ttl_ms: 30_000,
            grace_ms: 600_000,
            last_heartbeat_ms: 1_000,
            state: SiteState::Stale { since_ms: 40_000 },
            created_revision: 1,
            links: Vec::new(),
            instances: Vec::new(),
            xds_rejections: Vec::new(),
        };
        let export = Export {
            site: "east".into(),
            service: service.clone(),
            generation: 3,
            ports: vec![],
            endpoints: vec![],
            headless: false,
            created_revision: 2,
            updated_revision: 4,
        };
        let policy = Policy {
            name: "cart-from-web".into(),
            service: service.clone(),
            allow: vec![Principal::Site("west".into())],
        };
        let token = TokenUse {
            id: "t1".into(),
            site: "east".into(),
            used_at_ms: 5,
            expires_ms: 9,
            revoked: false,
        };
        let catalog = Catalog {
            revision: 4,
            sites: [("east".to_string(), Arc::new(site))].into(),
            exports: [((service.clone(), "east".to_string()), Arc::new(export))].into(),
            imports: [(
                (service.clone(), "west".to_string()),
                Arc::new(Import {
                    site: "west".into(),
                    service: service.clone(),
                    generation: 5,
                    ips: vec!["10.96.0.7".parse().expect("ip")],
                }),
            )]
            .into(),
            policies: [("cart-from-web".to_string(), Arc::new(policy))].into(),
            tokens: [("t1".to_string(), token)].into(),
            export_tombstones: [((service, "west".to_string()), 7)].into(),
            clock_ms: 11,
            revoked_sites: [("south".to_string(), 3)].into(),
            owners: [("payments".to_string(), vec!["east".to_string()])].into(),
        };
        let mut sessions = Sessions::default();
        let id = crate::types::RequestId { client: 9, seq: 4 };
        sessions.record(&id, 12, &Ok(meshbridge_core::model::Applied::default()));
        let bytes = encode(&catalog, &sessions).expect("encode");
        assert_eq!(decode(&bytes).expect("decode"), (catalog, sessions));
    }

    #[test]
    fn unknown_format_is_refused() {
        let err = decode(br#"{"format":99}"#).expect_err("format 99");
        assert!(matches!(err, StoreError::Format { found: 99, .. }), "{err}");
    }
}
