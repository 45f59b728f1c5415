//! Where herd keeps things in etcd, under a configurable prefix (default `/herd/`):
//! `<prefix>config/<section>` for shared configuration and
//! `<prefix>services/<service>/<instance-id>` for registrations.

/// Where herd's keys are, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

impl Layout {
    /// A layout under `prefix`, which must end with `/`.
    pub fn new(prefix: impl Into<String>) -> Self {
        let mut prefix = prefix.into();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self { prefix }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix of every configuration section.
    pub fn config_prefix(&self) -> String {
        format!("{}config/", self.prefix)
    }

    /// The key of one configuration section.
    pub fn config(&self, section: &str) -> String {
        format!("{}config/{section}", self.prefix)
    }

    /// Where herdctl notes when and how it last wrote a section (written in the same transaction,
    /// so that `config history` can tell when each revision was made).
    pub fn config_meta(&self, section: &str) -> String {
        format!("{}meta/config/{section}", self.prefix)
    }

    /// The section name of a configuration key, if it is one.
    pub fn section_of<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.prefix.as_str())?
            .strip_prefix("config/")
    }

    /// The prefix of every registration.
    pub fn services_prefix(&self) -> String {
        format!("{}services/", self.prefix)
    }

    /// The prefix of one service's registrations.
    pub fn service_prefix(&self, service: &str) -> String {
        format!("{}services/{service}/", self.prefix)
    }

    /// The registration key of one instance.
    pub fn instance(&self, service: &str, instance_id: &str) -> String {
        format!("{}services/{service}/{instance_id}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Layout::new("/herd");
        assert_eq!(k.config("catalog"), "/herd/config/catalog");
        assert_eq!(k.instance("tax", "i1"), "/herd/services/tax/i1");
        assert_eq!(k.section_of("/herd/config/fx"), Some("fx"));
        assert_eq!(k.section_of("/other/config/fx"), None);
    }
}
