//! Proto → model conversion, as the registry API runs it on every write: arbitrary bytes
//! decoded as the wire's `Export`, `Policy` and `SiteSpec` messages, converted to the model
//! and validated. Nothing may panic; whatever converts and validates must come back the same
//! through the wire form (model → proto → model), so no field is lost or reinterpreted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshbridge_core::proto::{self as pb, to_site_spec};
use meshbridge_model::{Export, Policy};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = pb::Export::decode(data)
        && let Ok(model) = Export::try_from(&e)
        && model.validate().is_ok()
    {
        let back = Export::try_from(&pb::Export::from(&model)).expect("a valid export converts back");
        assert_eq!(back, model, "export round trip");
    }
    if let Ok(p) = pb::Policy::decode(data)
        && let Ok(model) = Policy::try_from(&p)
        && model.validate().is_ok()
    {
        let back = Policy::try_from(&pb::Policy::from(&model)).expect("a valid policy converts back");
        assert_eq!(back, model, "policy round trip");
    }
    if let Ok(s) = pb::SiteSpec::decode(data)
        && let Ok(model) = to_site_spec(&s, 15_000, 600_000)
        && model.validate().is_ok()
    {
        let back = to_site_spec(&pb::SiteSpec::from(&model), 15_000, 600_000)
            .expect("a valid site spec converts back");
        assert_eq!(back, model, "site spec round trip");
    }
});
