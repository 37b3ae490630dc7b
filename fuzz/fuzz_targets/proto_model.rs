//! Proto → model conversion, as the registry API runs it on every write: arbitrary bytes
//! decoded as the wire's `Export`, `Policy` and `SiteSpec` messages, converted to the model
//! and validated. Nothing may panic; whatever converts and validates must come back the same
//! through the wire form (model → proto → model), so no field is lost or reinterpreted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbridge_core::proto::{self as pb, from_export, from_policy, from_site_spec, to_export, to_policy, to_site_spec};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = pb::Export::decode(data)
        && let Ok(model) = to_export(Some(&e))
        && model.validate().is_ok()
    {
        let back = to_export(Some(&from_export(&model))).expect("a valid export converts back");
        assert_eq!(back, model, "export round trip");
    }
    if let Ok(p) = pb::Policy::decode(data)
        && let Ok(model) = to_policy(Some(&p))
        && model.validate().is_ok()
    {
        let back = to_policy(Some(&from_policy(&model))).expect("a valid policy converts back");
        assert_eq!(back, model, "policy round trip");
    }
    if let Ok(s) = pb::SiteSpec::decode(data)
        && let Ok(model) = to_site_spec(Some(&s), 15_000, 600_000)
        && model.validate().is_ok()
    {
        let back = to_site_spec(Some(&from_site_spec(&model)), 15_000, 600_000)
            .expect("a valid site spec converts back");
        assert_eq!(back, model, "site spec round trip");
    }
});
