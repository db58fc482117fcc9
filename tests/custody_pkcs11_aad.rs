//! Wraps made inside a real SoftHSM2 token are bound to their purpose and tenant: a tenant
//! key wrapped for tenant A does not unwrap as tenant B's, nor as another purpose, nor under
//! another key. One test in its own process: the module reads `SOFTHSM2_CONF` once, when it is
//! loaded.

mod support;

use keyward::custody::pkcs11::{Pkcs11Kek, Pkcs11Settings};
use keyward::seal::{Kek, MasterKeyProvider, Purpose, SealError, Secret};
use support::hsm::SoftHsm;

#[test]
fn a_wrap_for_one_tenant_or_purpose_does_not_unwrap_as_another() {
    let Some(hsm) = SoftHsm::new("pkcs11_aad") else {
        return;
    };
    hsm.init_token("keyward", "4321");
    hsm.keygen("keyward", "4321", "master", false);
    hsm.keygen("keyward", "4321", "other", false);
    let pin_file = hsm.pin_file("pin", "4321");
    // SAFETY: the only test in this binary, before anything else reads the environment.
    unsafe { std::env::set_var("SOFTHSM2_CONF", &hsm.conf) };
    let open = |key: &str| {
        Pkcs11Kek::open(Pkcs11Settings {
            module: hsm.module.clone(),
            token_label: "keyward".into(),
            key_label: key.into(),
            pin_file: pin_file.clone(),
        })
        .unwrap()
    };
    let kek = MasterKeyProvider::new(Box::new(open("master")));
    let other = open("other");
    let tenant_a = Purpose::TenantKey { tenant: "ten_a" };
    let key = Secret::random(32);
    let wrapped = kek.wrap(tenant_a, &key).unwrap();
    assert_eq!(wrapped.len(), 12 + 32 + 16, "IV ‖ ciphertext ‖ tag");
    assert!(
        !wrapped.windows(32).any(|w| w == key.expose_secret()),
        "the key must not appear in its wrap"
    );
    assert_eq!(
        kek.unwrap(tenant_a, &wrapped).unwrap().expose_secret(),
        key.expose_secret()
    );
    for wrong in [
        Purpose::TenantKey { tenant: "ten_b" },
        Purpose::FingerprintKey { tenant: "ten_a" },
        Purpose::AuditMacKey,
        Purpose::KeyCheck,
    ] {
        let err = kek.unwrap(wrong, &wrapped).err();
        assert!(
            matches!(err, Some(SealError::Unauthentic)),
            "{wrong:?}: {err:?}"
        );
    }
    let err = other.unwrap(tenant_a, &wrapped).err();
    assert!(matches!(err, Some(SealError::Unauthentic)), "{err:?}");
    for i in [0, 12, wrapped.len() - 1] {
        let mut bad = wrapped.clone();
        bad[i] ^= 1;
        let err = kek.unwrap(tenant_a, &bad).err();
        assert!(
            matches!(err, Some(SealError::Unauthentic)),
            "byte {i}: {err:?}"
        );
    }
    assert!(matches!(
        kek.unwrap(tenant_a, &wrapped[..20]),
        Err(SealError::Malformed)
    ));
    // The key check tells the two keys apart.
    let kcv = kek.key_check_value().unwrap();
    assert!(kek.matches_check_value(&kcv).unwrap());
    assert!(!other.matches_check_value(&kcv).unwrap());
}
